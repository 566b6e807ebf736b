"""A preset's numbers for one run: clip and d_chi epsilon from public text's hidden states at the owner's cut.

The noise a preset adds is relative to what is sent: its mean norm is ``noise_ratio`` x the median token
norm after the owner's K blocks on public text (Python's documentation), and each token is clipped to a
quantile of those norms. Public text, never the owner's data, so the numbers reveal nothing private: the
coordinator computes them on the owner's head slice (coordinator.slices.owner_head) before anything is sent
and records them in the plan.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from edge_runtime.models.stage import StageModule
from edge_runtime.models.structure import find_parts
from edge_runtime.privacy.public_text import public_token_batches
from ringtune.privacy_spec import PRESETS, PrivacySpec

PUBLIC_SEQUENCES = 96
"""Public-text sequences the calibration runs through the owner's blocks."""


@torch.no_grad()
def calibrate(spec: PrivacySpec, head: Callable[[torch.Tensor], torch.Tensor], tokenizer, seq_len: int) -> PrivacySpec:
    """spec with its preset's clip and epsilon at the cut after head, the owner's head stage (ids [B, T] ->
    hidden states [B, T, d] as sent), or spec itself when it has none to compute."""
    if spec.calibrated:
        return spec
    preset = PRESETS[spec.preset]
    ids = public_token_batches(tokenizer, PUBLIC_SEQUENCES, seq_len)  # [S, T]
    states = torch.cat([head(batch) for batch in ids.split(8)])  # [S, T, d]
    return calibrated(spec, states, preset.noise_ratio, preset.clip_quantile)


def head_stage(model: torch.nn.Module, owner_blocks: int) -> StageModule:
    """The head stage of a whole model cut after owner_blocks blocks."""
    return StageModule(find_parts(model), model.config, (0, owner_blocks), "head")


def calibrated(spec: PrivacySpec, states: torch.Tensor, noise_ratio: float, clip_quantile: float) -> PrivacySpec:
    """spec (d_chi) with mean noise norm noise_ratio x the median token norm of public text's hidden states at
    the cut [S, T, d] and the clip at their clip_quantile (positions < spec.public, which travel unprivatized,
    left out)."""
    norms = states[:, spec.public:].norm(dim=-1).flatten().double()  # [S * (T - public)]
    median = float(norms.median())
    clip = float(torch.quantile(norms, clip_quantile, interpolation="lower"))  # 0.5: the median itself
    return replace(spec, clip=clip, epsilon=states.shape[-1] / (noise_ratio * median))


@torch.no_grad()
def head_states(model: torch.nn.Module, ids: torch.Tensor, ks: list[int]) -> dict[int, torch.Tensor]:
    """Hidden states [B, T, d] after k blocks for each k, running only the first max(ks) blocks."""
    parts = find_parts(model)
    captured: dict[int, torch.Tensor] = {}

    def capture(k):
        return lambda _, __, out: captured.__setitem__(k, out[0] if isinstance(out, tuple) else out)

    handles = [parts.blocks[k - 1].register_forward_hook(capture(k)) for k in ks]
    try:
        StageModule(parts, model.config, (0, max(ks)), "head")(ids)
    finally:
        for handle in handles:
            handle.remove()
    return captured
