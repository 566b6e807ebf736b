"""One check's result: what was measured, how bad it is, and what to do about it."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

Status = Literal["ok", "info", "warn", "fail"]
SEVERITY: dict[Status, int] = {"ok": 0, "info": 0, "warn": 1, "fail": 2}


@dataclass(frozen=True, slots=True)
class Finding:
    check: str
    """What was checked (``memory``, ``thermal``, ``mdns eth0``, ...)."""
    status: Status
    """ok; info: nothing wrong, worth knowing; warn: works, but slower or riskier; fail: will break a run."""
    detail: str
    """What was measured."""
    fix: str = ""
    """What to do about it (empty when nothing needs doing)."""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def worst(findings: list[Finding]) -> Status:
    """The most severe status among the findings (``ok`` for none)."""
    return max((f.status for f in findings), key=SEVERITY.__getitem__, default="ok")
