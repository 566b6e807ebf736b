"""Wire codecs: how the hidden states (forward) and their gradients (backward) travel in data-plane frames.

Plain data shared by the planner (a link costs the codec's bytes), the coordinator (which resolves
``auto`` and puts the spec in every assignment) and the agents (whose edges encode with it). The
tensor arithmetic is ``edge_runtime.transport.codecs``.

- ``fp32``: the tensor's bytes as they are (bit-identical training; the exactness tests run it).
- ``bf16`` / ``fp16``: rounded to 16 bits (half the bytes). fp16 keeps 3 more mantissa bits but
  overflows above 65504 and flushes gradients below 6e-8 to zero; bf16 keeps fp32's range.
- ``int8``: per token (each row of the last dimension) its ``OUTLIERS`` largest-magnitude channels
  in bf16 with their indices (int16), and the other channels rounded to int8 with an fp32 scale
  ``absmax / 127`` of what is left: d + 4 + 4 x OUTLIERS bytes per token instead of 4d. SmolLM2's
  hidden states have a few channels hundreds of times larger than the rest; a plain per-token
  absmax scale rounded every other channel of a token to a handful of levels (loss +17.2% against
  fp32 after 3 of the demo's steps). Keeping them apart (LLM.int8()'s outlier split, without its
  matmul) measured -1.3% with bf16 gradients (0.38x fp32's bytes) and +0.2% with int8 gradients
  (0.27x): benchmarks/README, "Wire codecs".
"""
from __future__ import annotations

from dataclasses import dataclass

CODECS = ("fp32", "bf16", "fp16", "int8")
"""Every codec a frame may name."""
AUTO = "auto"
"""Let the coordinator choose by the links' bandwidth (``WireSpec.resolve``)."""
SLOW_LINK_BYTES_PER_S = 1e9 / 8
"""Links slower than 1 Gbit/s get SLOW_LINK_CODEC under ``auto``."""
SLOW_LINK_CODEC = "bf16"
"""What ``auto`` picks on slow links, both ways: over the demo's 30 steps bf16 reached fp32's accuracy
(held-out loss 0.466 against 0.478, accuracy 57.3% against 55.3%; benchmarks/wire_codecs.py). Never int8:
it stays an explicit choice."""
GRADIENT_FOR = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16", "int8": "bf16"}
"""The gradient codec that goes with a single ``--wire CODEC``: int8 hidden states travel with bf16
gradients (gradients are more sensitive, as the literature finds; ``int8,int8`` forces int8 both ways)."""
WIRE_HELP = (f"codec of the hidden states and gradients between devices: {', '.join(CODECS)} (int8 sends bf16 "
             f"gradients), or ACT,GRAD (e.g. int8,int8); {AUTO}: {SLOW_LINK_CODEC} on links slower than 1 Gbit/s, "
             f"fp32 on faster ones. Default fp32 (bit for bit)")


class WireError(ValueError):
    """A --wire value that names no codec; the message lists the codecs."""


@dataclass(frozen=True, slots=True)
class WireSpec:
    """The codecs of one run's frames."""
    activation: str = "fp32"
    """Codec of the hidden states sent forward."""
    gradient: str = "fp32"
    """Codec of the gradients sent back."""

    def __post_init__(self) -> None:
        for codec in (self.activation, self.gradient):
            if codec not in CODECS:
                raise WireError(f"unknown wire codec {codec!r}: use one of {', '.join(CODECS)}")

    @staticmethod
    def parse(text: str) -> "WireSpec":
        """``CODEC`` (its gradient codec from GRADIENT_FOR) or ``ACT,GRAD``; ``auto`` is resolve()'s."""
        parts = [p.strip() for p in text.split(",")]
        if len(parts) == 1:
            return WireSpec(parts[0], GRADIENT_FOR.get(parts[0], parts[0]))
        if len(parts) == 2:
            return WireSpec(*parts)
        raise WireError(f"--wire {text!r}: give one codec or ACT,GRAD ({', '.join(CODECS)})")

    @staticmethod
    def resolve(text: str, slowest_link_bytes_per_s: float) -> "WireSpec":
        """The run's spec: ``auto`` is SLOW_LINK_CODEC when the slowest link is under 1 Gbit/s, else fp32."""
        if text != AUTO:
            return WireSpec.parse(text)
        slow = slowest_link_bytes_per_s < SLOW_LINK_BYTES_PER_S
        return WireSpec.parse(SLOW_LINK_CODEC) if slow else WireSpec()

    def codec(self, kind: str) -> str:
        """The codec of a frame kind: activation or gradient."""
        return self.activation if kind == "activation" else self.gradient

    def bytes_per_token(self, kind: str, hidden_size: int) -> int:
        """Payload bytes of one token's hidden state (or its gradient) in this spec."""
        return payload_bytes(self.codec(kind), 1, hidden_size)

    def describe(self) -> str:
        return self.activation if self.activation == self.gradient else f"{self.activation} forward, {self.gradient} back"


OUTLIERS = 8
"""Channels per token the int8 codec sends in bf16 beside the int8 rest."""


def outliers_per_token(width: int) -> int:
    """Channels per token of this width the int8 codec keeps in bf16 (all of a narrower vector)."""
    return min(OUTLIERS, width)


def payload_bytes(codec: str, rows: int, width: int) -> int:
    """Bytes of ``rows`` vectors of ``width`` floats encoded with ``codec``."""
    if codec == "fp32":
        return rows * width * 4
    if codec in ("bf16", "fp16"):
        return rows * width * 2
    if codec == "int8":
        # the row's int8 values, its fp32 scale, its outliers' int16 indices and bf16 values
        return rows * (width + 4 + 4 * outliers_per_token(width))
    raise WireError(f"unknown wire codec {codec!r}: use one of {', '.join(CODECS)}")
