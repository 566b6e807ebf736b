"""What the label attacks on the tail's gradients read, with the label fed as an input and with hidden labels.

    nice -n 10 python benchmarks/label_gradients.py --data train.jsonl [--owner-blocks 4] [--label-records 192]

Base smollm2-135m, gradients into block L - K with max-norm noise (the preset's), hidden states unprivatized.
For each encoding: the audit's norm, direction and end-aligned direction AUCs; the aligned attack on the last
position with a gradient only, without it, and on the last 4; and the same attacks after adding Gaussian noise
of 0.5-2x each position's mean gradient norm. Writes results/privacy_labels/label_gradients.json.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from audit.attacks import _end_aligned, label_auc
from audit.simulation import AuditSettings, _cut_gradients, _labelled, _privatized_gradients
from edge_runtime.data.dataset import read_records
from edge_runtime.models.registry import load_model, load_tokenizer
from edge_runtime.models.structure import find_parts
from edge_runtime.privacy.base import NoiseStream
from ringtune.privacy_spec import PrivacySpec

OUT = Path(__file__).parent / "results" / "privacy_labels" / "label_gradients.json"


def attacks(gradients: torch.Tensor, positive: torch.Tensor) -> dict:
    """gradients [r, T, d] as sent; positive [r] bool."""
    aligned = _end_aligned(gradients)  # [r, T, d], the last position with a gradient last
    found = {"all": label_auc(gradients, positive),
             "aligned last position only": label_auc(aligned[:, -1], positive)["direction_auc"],
             "aligned without the last position": label_auc(aligned[:, :-1], positive)["aligned_direction_auc"],
             "aligned last 4 positions": label_auc(aligned[:, -4:], positive)["direction_auc"]}
    sent = (gradients.abs().sum(-1, keepdim=True) > 0)  # [r, T, 1]: noise only where a gradient is sent
    scale = gradients.norm(dim=-1, keepdim=True).mean(dim=0, keepdim=True) / gradients.shape[-1] ** 0.5  # [1, T, 1]
    for ratio in (0.5, 1.0, 2.0):
        noise = torch.randn(gradients.shape, generator=torch.Generator().manual_seed(1))
        found[f"gaussian {ratio}x per-position norm"] = label_auc(gradients + ratio * scale * noise * sent, positive)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="prompt/completion training JSONL with one-token labels")
    parser.add_argument("--owner-blocks", type=int, default=4)
    parser.add_argument("--label-records", type=int, default=192)
    parser.add_argument("--seq-len", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    started, load = time.strftime("%Y-%m-%d %H:%M"), os.getloadavg()
    settings = AuditSettings("smollm2-135m", read_records(args.data), [], label_records=args.label_records,
                             seq_len=args.seq_len)
    model, tokenizer = load_model("smollm2-135m").eval(), load_tokenizer("smollm2-135m")
    labelled = _labelled(settings, tokenizer)
    start = len(find_parts(model).blocks) - args.owner_blocks
    results = {}
    for hide in (False, True):
        spec = PrivacySpec(gradient="maxnorm", hide_labels=hide)
        gradients = _cut_gradients(model, tokenizer, labelled.records, settings, [start], spec)[start]
        sent = _privatized_gradients(gradients, spec, settings, NoiseStream(0))
        results["hidden labels" if hide else "labels as inputs"] = attacks(sent, labelled.positive)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"model": "smollm2-135m", "owner_blocks": args.owner_blocks,
                               "label_records": args.label_records, "seq_len": args.seq_len, "gradient": "maxnorm",
                               "hidden": "off", "attacked": "base", "date": started,
                               "load_before": [round(x, 1) for x in load], "results": results}, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
