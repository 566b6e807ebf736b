"""How much of the hidden state at the owner's cut differs between tokens, against a preset's noise.

A preset's d_chi noise is sized to the median token norm of public text at the cut
(edge_runtime.privacy.calibration) and spread over every dimension. What the task needs is in the part
of a token's state that differs between tokens, and massive activations (a few dimensions, large on
some tokens) inflate the norm without carrying it. This script measures, on public text (the
calibration's own sequences, after a --public prefix) for each K: the share of the mean square in the
largest 1, 4 and 16 dimensions; the mean state's norm and the median centered norm (token minus the
mean token), over the median norm; the same centered norm outside the 16 largest dimensions; and the
noise a preset's ratio gives against those centered norms.

    .venv/bin/python benchmarks/cut_energy.py [--model smollm2-135m] [--ks 1,2,4] [--ratio 0.4]
        # -> results/cut_energy.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from edge_runtime.models.registry import load_model, load_tokenizer
from edge_runtime.privacy.calibration import head_states
from edge_runtime.privacy.public_text import public_token_batches

RESULTS = Path(__file__).parent / "results"


def energy_at_cut(states: torch.Tensor, public: int, ratio: float) -> dict[str, float]:
    """states [S, T, d] at one cut; positions < public left out, as the calibration does."""
    x = states[:, public:].reshape(-1, states.shape[-1]).double()  # [N, d]
    square = (x ** 2).mean(0)  # [d]
    share = square.sort(descending=True).values.cumsum(0) / square.sum()
    median = x.norm(dim=-1).median()
    deviation = x - x.mean(0)  # [N, d] what differs between tokens
    centered = deviation.norm(dim=-1).median()
    rest = square.argsort(descending=True)[16:]  # every dimension but the 16 largest
    centered_rest = deviation[:, rest].norm(dim=-1).median()
    return {"median_norm": round(float(median), 2),
            **{f"energy_share_top{n}": round(float(share[n - 1]), 3) for n in (1, 4, 16)},
            "mean_state_norm_over_median_norm": round(float(x.mean(0).norm() / median), 3),
            "median_centered_norm_over_median_norm": round(float(centered / median), 3),
            "median_centered_norm_outside_top16_over_median_norm": round(float(centered_rest / median), 3),
            "noise_norm_over_centered_norm": round(float(ratio * median / centered), 3),
            # the noise's share in those dimensions (isotropic: (d - 16) / d of its square) against their content
            "noise_over_centered_outside_top16": round(float(ratio * median * ((x.shape[1] - 16) / x.shape[1]) ** 0.5
                                                             / centered_rest), 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ks", default="1,2,4", help="comma-separated owner blocks K (cuts after block K)")
    parser.add_argument("--ratio", type=float, default=0.4, help="noise norm over the median norm (a preset's)")
    parser.add_argument("--public", type=int, default=3, help="leading public positions left out")
    parser.add_argument("--sequences", type=int, default=96)
    parser.add_argument("--seq-len", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_model(args.model).eval()
    ids = public_token_batches(load_tokenizer(args.model), args.sequences, args.seq_len)  # [S, T]
    ks = [int(k) for k in args.ks.split(",")]
    states = head_states(model, ids, ks)
    result = {"model": args.model, "sequences": args.sequences, "seq_len": args.seq_len, "public": args.public,
              "ratio": args.ratio, "cuts": {k: energy_at_cut(states[k], args.public, args.ratio) for k in ks}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cut_energy.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
