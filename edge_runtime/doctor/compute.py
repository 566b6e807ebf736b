"""Checks of the compute stack: a CPU-only torch, its import time, and matmul speed against a profile."""
from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

from device_profiles import BUILTIN_PROFILES, DeviceProfile
from edge_runtime.doctor.finding import Finding

SLOW_IMPORT_SECONDS = 10.0
"""A Pi 4 on a good SD card imports torch in a few seconds; much more means slow storage."""
SLOW_RATIO = 0.7
"""Measured GFLOP/s below this share of the matched profile: something slows the device down."""
CPU_TORCH_FIX = ("python -m pip uninstall -y torch triton $(python -m pip list --format=freeze | grep -o "
                 "'^nvidia[^=]*') && python -m pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu")
MODEL_PROFILES = ((r"Raspberry Pi 5", "rpi5-"), (r"Raspberry Pi 4", "rpi4-"), (r"Raspberry Pi Zero 2", "rpi-zero2w"),
                  (r"Orin Nano", "jetson-orin-nano"))
"""Device-tree model text -> the prefix of the built-in profiles for that board."""


def torch_build_findings(torch_version: str, cuda_version: str | None, distributions: list[str]) -> list[Finding]:
    """``torch.__version__``, ``torch.version.cuda`` and the installed distribution names."""
    cuda = sorted(name for name in distributions if re.match(r"^(nvidia[-_]|triton$|cuda[-_])", name.lower()))
    if cuda_version is not None or cuda:
        what = f"torch {torch_version} is a CUDA {cuda_version} build" if cuda_version else f"torch {torch_version}"
        extra = f", with {len(cuda)} CUDA package(s) installed ({', '.join(cuda[:4])}{', ...' if len(cuda) > 4 else ''})"
        return [Finding("torch build", "warn", what + (extra if cuda else ""),
                        f"ringtune runs on CPUs; the CUDA libraries only take disk and RAM: {CPU_TORCH_FIX}")]
    return [Finding("torch build", "ok", f"torch {torch_version}, CPU only")]


def torch_import_seconds() -> float:
    """Wall time of ``import torch`` in a fresh interpreter (what every agent start pays)."""
    script = "import time; t = time.perf_counter(); import torch; print(time.perf_counter() - t)"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    return float(result.stdout.strip().splitlines()[-1])


def import_time_findings(seconds: float) -> list[Finding]:
    if seconds > SLOW_IMPORT_SECONDS:
        return [Finding("torch import", "warn", f"import torch took {seconds:.1f} s",
                        "slow storage: keep the virtual environment on an SSD (USB 3) or an A2-rated SD card; "
                        "the first import after a boot is the slowest")]
    return [Finding("torch import", "ok", f"import torch took {seconds:.1f} s")]


def matching_profile(model: str, total_ram_bytes: int) -> DeviceProfile | None:
    """The built-in profile of this board (device-tree model text), in the RAM size nearest to this one."""
    for pattern, prefix in MODEL_PROFILES:
        if re.search(pattern, model):
            candidates = [p for name, p in BUILTIN_PROFILES.items() if name.startswith(prefix)]
            return min(candidates, key=lambda p: abs(_nominal_ram(p) - total_ram_bytes))
    return None


def _nominal_ram(profile: DeviceProfile) -> float:
    size = re.search(r"(\d+)gb", profile.name)
    return int(size.group(1)) * 2**30 if size else profile.ram_bytes


def board_model(path: Path = Path("/proc/device-tree/model")) -> str:
    try:
        return path.read_text().strip("\x00\n ")
    except OSError:
        return ""


def gflops_findings(measured: float, threads: int, profile: DeviceProfile | None, how_matched: str) -> list[Finding]:
    detail = f"{measured:.1f} GFLOP/s fp32 matmul on {threads} thread(s)"
    if profile is None:
        return [Finding("matmul speed", "info", detail + f"; {how_matched}",
                        "plan with this device's own numbers: `ringtune profile --json > me.json`, then "
                        "`ringtune plan --device-file me.json`")]
    ratio = measured / profile.gflops
    detail += f", {ratio:.0%} of the {profile.name} profile's {profile.gflops:g} ({how_matched})"
    if ratio < SLOW_RATIO:
        return [Finding("matmul speed", "warn", detail,
                        "something slows this device down: see temperature, throttling and governor above, "
                        "and stop other busy programs (`top`)")]
    return [Finding("matmul speed", "ok", detail)]


def installed_distributions() -> list[str]:
    return [d.metadata["Name"] for d in importlib.metadata.distributions() if d.metadata["Name"]]
