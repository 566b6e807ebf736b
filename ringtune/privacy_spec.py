"""What the owner privatizes before hidden states and gradients leave it, as plain data (no torch).

``--privacy dchi:epsilon=E,clip=C`` | ``gaussian:sigma=S,clip=C[,delta=D]`` | ``off`` (add ``seed=N`` for
reproducible noise, ``public=N`` to send the first N positions, a fixed public prompt template, as they are)
and ``--grad-privacy maxnorm|withhold|off`` parse into a ``PrivacySpec``. A preset (``--privacy strong[,public=N]``)
names a d_chi setting whose numbers are calibrated on public text at the run's cut
(``edge_runtime.privacy.calibration``) before anything is sent.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

from ringtune.optimizer_spec import OptimizerSpec

HIDDEN_MECHANISMS = ("off", "dchi", "gaussian")
GRADIENT_MECHANISMS = ("off", "maxnorm", "withhold")
GRADIENT_HELP = {"off": "gradients sent back as they are",
                 "maxnorm": "gradients sent back with max-norm noise (equalizes their norms in a micro-batch)",
                 "withhold": "no gradient leaves the owner: only its tail blocks' LoRA trains, the helpers and its "
                             "head run forward only"}
GRADIENT_PRIVACY_HELP = "what leaves the owner's tail: " + "; ".join(f"{k}: {v}" for k, v in GRADIENT_HELP.items())
_KEYS = {"off": set(), "dchi": {"epsilon", "clip", "seed", "public", "hide_labels"},
         "gaussian": {"sigma", "clip", "delta", "seed", "public", "hide_labels"}}
_INTEGER_KEYS = {"seed", "public", "hide_labels"}


@dataclass(frozen=True, slots=True)
class PrivacyPreset:
    """A named d_chi setting calibrated per run: its clip and epsilon follow the hidden-state norms of public
    text at the run's cut, so the same preset means the same noise relative to what is sent on any model."""
    name: str
    """What --privacy calls it."""
    owner_blocks: int
    """Blocks the owner keeps at each end at least (raises --min-owner-blocks)."""
    noise_ratio: float
    """Mean noise norm over the median token norm of public text at the cut."""
    clip_quantile: float
    """Per-token clip: this quantile of public text's token norms at the cut."""
    gradient: str
    """Gradient mechanism it includes."""
    lr: float
    """AdamW learning rate of its runs when --lr is not given: with withheld gradients only the owner's tail
    trains, and fewer trained blocks need larger steps than a fine-tune of every block."""
    measured: str
    """What it was measured to do (benchmarks/README.md), for --help."""


PRESETS = {p.name: p for p in (
    PrivacyPreset("strong", owner_blocks=8, noise_ratio=0.01, clip_quantile=0.5, gradient="withhold", lr=3e-3,
                  measured="on smollm2-135m its cut and noise lower a learned inverter's token recovery to 31% of the "
                           "private tokens against 82% for the default split (-63%; its head never trains, so the "
                           "helpers see the base model's states and this holds after any fine-tune), its hidden labels "
                           "bring the label read from hidden states to chance (AUC 0.53) and it sends no gradient to "
                           "read labels from; after a 300-step fine-tune at its lr held-out accuracy is 70.3% against "
                           "68.3% without privacy at lr 1e-3 (70.0% with a second seed; benchmarks/README.md)"),
)}
PRIVACY_HELP = ("dchi:epsilon=E,clip=C (d_chi noise, density ~ exp(-E ||z - x||) after clipping each token to "
                "L2 norm C) | gaussian:sigma=S,clip=C[,delta=D] | off | a preset: "
                + "; ".join(f"{p.name} (at least {p.owner_blocks} owner blocks at each end, d_chi noise "
                            f"{p.noise_ratio:g}x the median hidden-state norm at the cut, {GRADIENT_HELP[p.gradient]}, "
                            f"lr {p.lr:g} unless --lr says otherwise; {p.measured})" for p in PRESETS.values())
                + ". Add seed=N for reproducible noise, public=N when the first N tokens of every sequence are a "
                "fixed public prompt template (sent unprivatized; checked to be identical in every sequence), "
                "hide_labels=1 (dchi, gaussian; presets always do) to keep prompt/completion labels out of what "
                "is sent: only each completion's first token is trained, predicted from the prompt, and no "
                "completion token is fed to the model (completions must be one token)")

PRIVACY_ARG_HELP = PRIVACY_HELP.replace("%", "%%")
"""PRIVACY_HELP as an argparse help= (which formats it with %: the presets' numbers carry percent signs)."""


@dataclass(frozen=True, slots=True)
class PrivacySpec:
    hidden: str = "off"
    """Mechanism on hidden states leaving the owner's head stage: off, dchi or gaussian."""
    epsilon: float = 0.0
    """d_chi: noise density ~ exp(-epsilon * ||noise||) (per unit of L2 distance)."""
    sigma: float = 0.0
    """gaussian: standard deviation of the noise per coordinate."""
    clip: float = 0.0
    """Per-token L2 bound applied before the noise (dchi, gaussian)."""
    delta: float = 1e-5
    """gaussian: the delta of the stated (epsilon, delta) per token."""
    gradient: str = "off"
    """Mechanism on gradients leaving the owner's tail stage: off, maxnorm, or withhold (none leaves: the stages
    before the tail run forward only and only the tail trains)."""
    seed: int | None = None
    """Noise seed for reproducible runs (tests, audits); None: the owner draws one from its CSPRNG."""
    public: int = 0
    """Leading positions of every sequence that hold a shared public prompt prefix and travel unprivatized."""
    preset: str = ""
    """The preset these numbers come from ("": none); clip and epsilon stay 0 until calibrated."""
    hide_labels: bool = False
    """Prompt/completion records train only their one-token completion, predicted from the prompt, and the
    completion is never an input: no hidden state sent depends on a label (edge_runtime.data.dataset)."""

    def __post_init__(self) -> None:
        if self.hidden not in HIDDEN_MECHANISMS:
            raise ValueError(f"unknown privacy mechanism {self.hidden!r}: use one of {', '.join(HIDDEN_MECHANISMS)}")
        if self.gradient not in GRADIENT_MECHANISMS:
            raise ValueError(f"unknown gradient privacy {self.gradient!r}: use one of {', '.join(GRADIENT_MECHANISMS)}")
        if self.preset and self.preset not in PRESETS:
            raise ValueError(f"unknown privacy preset {self.preset!r}: use one of {', '.join(PRESETS)}")
        if self.preset and not self.calibrated and (self.clip or self.epsilon):
            raise ValueError(f"preset {self.preset} is calibrated with both clip and epsilon, or neither")
        if self.hidden != "off" and self.calibrated and not (self.clip > 0 and math.isfinite(self.clip)):
            raise ValueError(f"--privacy {self.hidden} needs clip=C > 0 (the per-token L2 bound)")
        if self.hidden == "dchi" and self.calibrated and not (self.epsilon > 0 and math.isfinite(self.epsilon)):
            raise ValueError("--privacy dchi needs epsilon=E > 0")
        if self.hidden == "gaussian" and not (self.sigma > 0 and math.isfinite(self.sigma)):
            raise ValueError("--privacy gaussian needs sigma=S > 0")
        if self.hidden == "gaussian" and not 0 < self.delta < 1:
            raise ValueError("--privacy gaussian needs 0 < delta < 1")
        if not isinstance(self.public, int) or self.public < 0:
            raise ValueError(f"--privacy public={self.public!r}: give the number of leading public template "
                             f"tokens as a whole number >= 0 (0: privatize every position)")
        if self.public and self.hidden == "off":
            raise ValueError("public=N only applies to a hidden-state mechanism: use it with dchi or gaussian")
        if not isinstance(self.hide_labels, bool):
            raise ValueError(f"--privacy hide_labels={self.hide_labels!r}: give 1 (keep labels out of what is sent) "
                             f"or 0")

    @property
    def active(self) -> bool:
        return self.hidden != "off" or self.gradient != "off"

    def trains(self, role: str) -> bool:
        """Whether a stage of this role trains its LoRA: every stage, except that when gradients are withheld only
        the tail does (and a one-stage run's full stage, which sends nothing)."""
        return self.gradient != "withhold" or role in ("tail", "full")

    def owner_blocks(self, requested: int) -> int:
        """Blocks the owner keeps at each end: requested (--min-owner-blocks), raised to a preset's own."""
        return max(requested, PRESETS[self.preset].owner_blocks if self.preset else 0)

    def learning_rate(self, given: float | None) -> float:
        """The run's AdamW learning rate: --lr when given, else a preset's own, else the optimizer's default."""
        if given is not None:
            return given
        return PRESETS[self.preset].lr if self.preset else OptimizerSpec().lr

    @property
    def calibrated(self) -> bool:
        """False for a preset whose clip and epsilon are not computed yet (see privacy.calibration)."""
        return not self.preset or (self.clip > 0 and self.epsilon > 0)

    def token_epsilon(self) -> float | None:
        """Privacy loss per token between any two clipped hidden states (sensitivity 2C): pure epsilon
        for d_chi, the epsilon of (epsilon, delta) for the Gaussian mechanism; None when off."""
        if not self.calibrated:
            return None
        if self.hidden == "dchi":
            return 2 * self.clip * self.epsilon
        if self.hidden == "gaussian":
            return gaussian_epsilon(2 * self.clip, self.sigma, self.delta)
        return None

    def describe(self) -> str:
        parts = {"off": "hidden states unprivatized",
                 "dchi": f"d_chi epsilon={self.epsilon:g}/unit, clip={self.clip:g}",
                 "gaussian": f"gaussian sigma={self.sigma:g}, clip={self.clip:g}"}[self.hidden]
        if not self.calibrated:
            parts = "d_chi calibrated on public text at the cut"
        if self.preset:
            parts = f"preset {self.preset}: {parts}"
        if self.public:
            parts += f", first {self.public} position{'s' if self.public > 1 else ''} public"
        if self.hide_labels:
            parts += ", labels never sent (one-token completions)"
        if self.hidden != "off" and self.calibrated:
            delta = f", delta={self.delta:g}" if self.hidden == "gaussian" else ""
            parts += f" (per token epsilon={self.token_epsilon():.3g}{delta})"
        return parts + ("; gradients withheld (only the owner's tail trains)" if self.gradient == "withhold"
                        else f"; gradients {self.gradient}")

    def check_seq_len(self, seq_len: int) -> None:
        """ValueError when sequences of seq_len tokens would have no privatized position left."""
        if self.public and seq_len <= self.public:
            raise ValueError(f"--privacy public={self.public} leaves nothing to privatize in sequences of "
                             f"{seq_len} tokens: lower public= or raise --seq-len")

    def to_dict(self) -> dict:
        # public=0, no preset and hide_labels=False are left out so that a spec without them serializes exactly as
        # before they existed
        return {k: v for k, v in asdict(self).items() if k not in ("public", "preset", "hide_labels") or v}

    def public_dict(self) -> dict:
        """What may be recorded in the plan every agent sees: the mechanism, never the noise seed."""
        return {k: v for k, v in self.to_dict().items() if k != "seed"} if self.active else {}

    @staticmethod
    def from_dict(data: dict | None) -> "PrivacySpec":
        if not data:
            return PrivacySpec()
        seed = data.get("seed")
        return PrivacySpec(hidden=str(data.get("hidden", "off")), epsilon=float(data.get("epsilon", 0.0)),
                           sigma=float(data.get("sigma", 0.0)), clip=float(data.get("clip", 0.0)),
                           delta=float(data.get("delta", 1e-5)), gradient=str(data.get("gradient", "off")),
                           seed=None if seed is None else int(seed), public=int(data.get("public", 0)),
                           preset=str(data.get("preset", "")), hide_labels=bool(data.get("hide_labels", False)))

    @staticmethod
    def parse(hidden: str | None, gradient: str | None = None) -> "PrivacySpec":
        """From the CLI strings; ValueError naming the expected form on bad input. A preset brings its own
        gradient mechanism (gradient is then ignored), always hides labels and takes only seed= and public=."""
        text = (hidden or "off").strip()
        name = re.match(r"[^:,]*", text).group().strip()
        rest = text[len(name):].lstrip(":,")
        if name in PRESETS:
            values = _values(text, rest, {"seed", "public"}, f"the preset {name} takes only public=N and seed=N "
                                                             f"(it calibrates its noise and clip at the cut)")
            return PrivacySpec(hidden="dchi", gradient=PRESETS[name].gradient, preset=name, hide_labels=True, **values)
        if name not in _KEYS:
            raise ValueError(f"--privacy {hidden!r}: expected {PRIVACY_HELP}")
        values = _values(text, rest, _KEYS[name], f"expected {PRIVACY_HELP}")
        if values.get("hide_labels", 0) not in (0, 1):
            raise ValueError(f"--privacy {text!r}: hide_labels takes 1 (keep labels out of what is sent) or 0")
        values["hide_labels"] = bool(values.get("hide_labels", 0))
        return PrivacySpec(hidden=name, gradient=(gradient or "off").strip(), **values)


def _values(text: str, rest: str, keys: set[str], expected: str) -> dict[str, float | int]:
    """KEY=VALUE items of a --privacy text, checked against keys."""
    values: dict[str, float | int] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in keys:
            raise ValueError(f"--privacy {text!r}: {item!r} is not one of {sorted(keys) or 'nothing'}; {expected}")
        try:
            values[key] = int(value) if key in _INTEGER_KEYS else float(value)
        except ValueError:
            kind = "a whole number" if key in _INTEGER_KEYS else "a number"
            raise ValueError(f"--privacy {text!r}: {key} needs {kind}, got {value!r}") from None
    return values


def gaussian_epsilon(sensitivity: float, sigma: float, delta: float) -> float:
    """Smallest epsilon for which N(0, sigma^2) noise is (epsilon, delta)-DP at this L2 sensitivity
    (the analytic Gaussian mechanism, Balle & Wang 2018: exact, also for epsilon > 1)."""
    def delta_at(eps: float) -> float:
        a, b = sensitivity / (2 * sigma), eps * sigma / sensitivity
        tail = _phi(-a - b)
        return _phi(a - b) - (math.exp(min(eps + math.log(tail), 700.0)) if tail > 0 else 0.0)

    low, high = 0.0, 1.0
    while delta_at(high) > delta:
        low, high = high, high * 2
        if high > 1e6:
            return math.inf
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if delta_at(mid) > delta else (low, mid)
    return high


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))
