"""What an agent advertises over mDNS: identity, control endpoint and a profile summary.

Pure data (no zeroconf import) so the coordinator, the CLI and tests share one definition. The
TXT encoding keeps keys short because every ``key=value`` must fit in 255 bytes.
"""
from __future__ import annotations

import ipaddress
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Literal
from urllib.parse import urlsplit

SERVICE_TYPE = "_ringtune._tcp.local."
TXT_VERSION = "1"
RUNTIMES = ("torch", "executorch")
Runtime = Literal["torch", "executorch"]
_TXT_ITEM_MAX = 255


class AdvertError(ValueError):
    """An advert that cannot be published or was received malformed."""


@dataclass(frozen=True, slots=True)
class AgentAdvert:
    """One agent as seen on the network."""

    agent_id: str
    """Stable unique id of the agent (kept in its state directory)."""
    name: str
    """Human name shown to the user and used by ``--discover NAME``, e.g. ``pi-a``."""
    version: str
    """ringtune version the agent runs."""
    control_url: str
    """Control-plane endpoint, e.g. ``tcp://192.168.1.20:7800``."""
    cores: int
    """CPU cores usable for training."""
    ram_bytes: int
    """RAM usable for training, in bytes."""
    gflops: float
    """Measured matmul throughput, in GFLOP/s."""
    runtime: Runtime
    """Execution runtime: torch or executorch."""
    has_data: bool
    """True when the agent holds private data, i.e. it can be the run's owner."""
    busy: str = ""
    """Lineage of the run the agent serves while its coordinator is heard from ("": free); a coordinator
    counting devices takes only free agents (or those busy with the run it resumes)."""

    def __post_init__(self) -> None:
        if not self.agent_id or not self.name:
            raise AdvertError("an agent needs a non-empty id and name")
        if self.runtime not in RUNTIMES:
            raise AdvertError(f"runtime {self.runtime!r} is not one of {', '.join(RUNTIMES)}")
        if self.cores < 1 or self.ram_bytes < 0 or not 0 <= self.gflops < math.inf:
            raise AdvertError(f"profile of {self.name!r} has impossible values: cores={self.cores}, "
                              f"ram_bytes={self.ram_bytes}, gflops={self.gflops}")
        host, port = _split_url(self.control_url)
        if not host or not 0 < port < 65536:
            raise AdvertError(f"control endpoint {self.control_url!r} must look like tcp://HOST:PORT")

    @property
    def host(self) -> str:
        """Host part of the control endpoint."""
        return _split_url(self.control_url)[0]

    @property
    def port(self) -> int:
        """TCP port of the control endpoint."""
        return _split_url(self.control_url)[1]

    @property
    def address(self) -> str:
        """``host:port`` of the control endpoint, for display."""
        return f"{self.host}:{self.port}"

    @property
    def has_wildcard_host(self) -> bool:
        """True when the agent listens on all addresses (0.0.0.0 or ::), so peers need its mDNS address."""
        return ipaddress.ip_address(self.host).is_unspecified if _is_ip(self.host) else False

    def with_host(self, host: str) -> AgentAdvert:
        """The same advert reachable at ``host`` (keeps scheme and port)."""
        scheme = urlsplit(self.control_url).scheme
        shown = f"[{host}]" if ":" in host else host
        return replace(self, control_url=f"{scheme}://{shown}:{self.port}")

    def to_txt(self) -> dict[str, str]:
        """TXT properties for the mDNS record."""
        properties = {"txtvers": TXT_VERSION, "id": self.agent_id, "name": self.name,
                      "ver": self.version, "ctl": self.control_url, "cores": str(self.cores),
                      "ram": str(self.ram_bytes), "gflops": f"{self.gflops:.6g}",
                      "rt": self.runtime, "data": "1" if self.has_data else "0", "busy": self.busy}
        for key, value in properties.items():
            if len(key) + 1 + len(value.encode()) > _TXT_ITEM_MAX:
                raise AdvertError(f"TXT item {key!r} is over {_TXT_ITEM_MAX} bytes: shorten the agent's {key}")
        return properties

    @classmethod
    def from_txt(cls, properties: Mapping[bytes | str, bytes | str | None]) -> AgentAdvert:
        """Parse TXT properties as received (bytes keys/values from zeroconf, or str)."""
        text = {_text(k): _text(v) for k, v in properties.items()}
        if text.get("txtvers") != TXT_VERSION:
            raise AdvertError(f"TXT version {text.get('txtvers')!r} is not {TXT_VERSION!r}: "
                              "upgrade ringtune on the older side")
        try:
            return cls(agent_id=text["id"], name=text["name"], version=text["ver"],
                       control_url=text["ctl"], cores=int(text["cores"]), ram_bytes=int(text["ram"]),
                       gflops=float(text["gflops"]), runtime=text["rt"],  # type: ignore[arg-type]
                       has_data=text["data"] == "1", busy=text.get("busy", ""))
        except KeyError as missing:
            raise AdvertError(f"TXT record lacks {missing}") from None
        except AdvertError:
            raise
        except (TypeError, ValueError) as error:
            raise AdvertError(f"TXT record is malformed: {error}") from None


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _split_url(url: str) -> tuple[str, int]:
    try:
        parts = urlsplit(url)
        return parts.hostname or "", parts.port or 0
    except ValueError:
        return "", 0


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
