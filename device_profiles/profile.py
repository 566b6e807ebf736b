"""DeviceProfile: what the planner needs to know about one device, and profile files (TOML/JSON).

A profile file holds one device (a table/object with the fields below) or several under
``device`` (TOML ``[[device]]`` tables, or a JSON list). Friendly units are accepted too:
``ram_gb`` for ``ram_bytes`` and ``link_mbit_s`` for ``link_bytes_per_s``. The JSON that
``ringtune profile --json`` prints is a valid profile file.
"""
from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

GB = 1e9
FIELDS = ("ram_bytes", "cores", "gflops", "link_bytes_per_s")
BASELINE_BYTES = 450_000_000
"""An agent's runtime with no run loaded, as measured here (x86-64, torch 2.13, transformers, peft)."""
BASELINE_SOURCE = "estimate: an idle agent measured 0.45 GB on x86-64 with torch 2.13"


class ProfileError(ValueError):
    """A device profile or profile file that cannot be used; the message says how to fix it."""


@dataclass(frozen=True, slots=True)
class DeviceProfile:
    name: str
    """Device (agent) name; unique within a run."""
    ram_bytes: int
    """RAM the agent process may use: total minus the OS (its own runtime, ``baseline_bytes``, included)."""
    cores: int
    """CPU cores torch uses."""
    gflops: float
    """Sustained fp32 matmul GFLOP/s of PyTorch on the CPU at stage-like sizes."""
    link_bytes_per_s: float
    """Network bandwidth of the device's link (one direction), in bytes per second."""
    sources: dict[str, str] = field(default_factory=dict, compare=False)
    """Where each number comes from (a measurement or "estimate"), by field name."""
    baseline_bytes: int = BASELINE_BYTES
    """Resident bytes of the agent's runtime with no run loaded (Python, torch, transformers, peft),
    measured by each agent; the planner adds its stages' memory to it."""

    def __post_init__(self) -> None:
        for name in (*FIELDS, "baseline_bytes"):
            if not getattr(self, name) > 0:
                raise ProfileError(f"device {self.name!r}: {name} must be > 0, got {getattr(self, name)}")

    def renamed(self, name: str) -> "DeviceProfile":
        return replace(self, name=name, sources=dict(self.sources))

    def to_dict(self) -> dict:
        return asdict(self)


def profile_from_dict(data: dict, origin: str = "profile") -> DeviceProfile:
    """A profile from plain data; ``ram_gb`` and ``link_mbit_s`` stand in for the byte fields."""
    data = dict(data)
    if "ram_gb" in data:
        data["ram_bytes"] = int(float(data.pop("ram_gb")) * GB)
    if "link_mbit_s" in data:
        data["link_bytes_per_s"] = float(data.pop("link_mbit_s")) * 1e6 / 8
    missing = [name for name in ("name", *FIELDS) if name not in data]
    unknown = sorted(set(data) - {"name", "sources", "baseline_bytes", *FIELDS})
    if missing or unknown:
        raise ProfileError(
            f"{origin}: missing {missing} / unknown {unknown} fields; a device needs name, ram_bytes "
            f"(or ram_gb), cores, gflops and link_bytes_per_s (or link_mbit_s)")
    return DeviceProfile(name=str(data["name"]), ram_bytes=int(data["ram_bytes"]), cores=int(data["cores"]),
                         gflops=float(data["gflops"]), link_bytes_per_s=float(data["link_bytes_per_s"]),
                         sources={str(k): str(v) for k, v in dict(data.get("sources", {})).items()},
                         baseline_bytes=int(data.get("baseline_bytes", BASELINE_BYTES)))


def parse_profiles(text: str, suffix: str, origin: str = "profile file") -> list[DeviceProfile]:
    """Profiles from the text of a .toml or .json file."""
    try:
        data = tomllib.loads(text) if suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as error:
        raise ProfileError(f"{origin} is not valid {suffix.lstrip('.').upper() or 'JSON'}: {error}") from None
    if isinstance(data, dict) and "device" in data:
        data = data["device"]
    entries = data if isinstance(data, list) else [data]
    profiles = [profile_from_dict(entry, f"{origin} entry {i}") for i, entry in enumerate(entries)]
    names = [p.name for p in profiles]
    if len(set(names)) != len(names):
        raise ProfileError(f"{origin} names a device twice: {names}")
    return profiles


def load_profiles(path: str | Path) -> list[DeviceProfile]:
    """Profiles from a TOML (``.toml``) or JSON file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ProfileError(f"cannot read the device profile file {path}: {error.strerror}") from None
    return parse_profiles(text, path.suffix.lower(), str(path))
