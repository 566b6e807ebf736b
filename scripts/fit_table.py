"""README's "How big a model can I fine-tune?": `ringtune plan` for common device sets, model sizes and base dtypes.

Every cell is one `ringtune plan --json` (run in this process, so the cost tables are traced once); the
table replaces what stands between the README's fit-table markers.

    .venv/bin/python scripts/fit_table.py [--check]    # --check: exit 1 if the README's table is stale
"""
from __future__ import annotations

import argparse
import contextlib
import io
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = ROOT / "scripts" / "model_configs"
# label -> (--model or --model-config value, its published name)
MODELS = {
    "135M": ("smollm2-135m", "SmolLM2-135M"),
    "0.5B": (str(CONFIGS / "qwen2.5-0.5b.json"), "Qwen2.5-0.5B"),
    "1B": (str(CONFIGS / "llama-3.2-1b.json"), "Llama-3.2-1B"),
    "3B": (str(CONFIGS / "llama-3.2-3b.json"), "Llama-3.2-3B"),
    "7B": (str(CONFIGS / "llama-2-7b.json"), "Llama-2-7B"),
}
# label -> --device arguments; the first device is the owner
DEVICE_SETS = {
    "3 x rpi4-4gb": ["rpi4-4gb:pi-0", "rpi4-4gb:pi-1", "rpi4-4gb:pi-2"],
    "4 x rpi5-8gb": [f"rpi5-8gb:pi-{i}" for i in range(4)],
    "8 x rpi5-8gb": [f"rpi5-8gb:pi-{i}" for i in range(8)],
    "laptop + 2 x rpi4-4gb": ["laptop:laptop", "rpi4-4gb:pi-0", "rpi4-4gb:pi-1"],
}
DTYPES = ("fp32", "bf16", "int8", "int4")
SHAPE = ["--micro-batch-size", "2", "--seq-len", "64", "--micro-batches", "4", "--schedule", "1f1b"]
START, END = "<!-- fit-table:start (scripts/fit_table.py writes this) -->", "<!-- fit-table:end -->"


def plan(model: str, devices: list[str], dtype: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `ringtune plan --json` for this cell."""
    from ringtune.cli import main

    source = ["--model", model] if not model.endswith(".json") else ["--model-config", model]
    argv = ["plan", *source, *(arg for d in devices for arg in ("--device", d)), "--owner",
            devices[0].partition(":")[2], *SHAPE, "--base-dtype", dtype, "--json"]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def cell(model: str, devices: list[str], dtype: str) -> str:
    from device_profiles.builtin import resolve_device
    from ringtune.plan import Plan

    code, out, err = plan(model, devices, dtype)
    if code != 0:  # "needs at least 14.0 GB ..." or "the blocks need 8.5 GB or more ... whole range"
        needs = re.search(r"needs? (?:at least )?([\d.]+) GB", err)
        if needs is None:
            raise SystemExit(f"ringtune plan failed for {model} on {devices} at {dtype}:\n{err}")
        available = sum(resolve_device(d).ram_bytes for d in devices) / 1e9
        return f"no: needs {needs.group(1)} of {available:.1f} GB"
    result = Plan.from_json(out)
    used = len(result.devices())
    return f"{result.predicted['tokens_per_second']:.1f} tok/s" + ("" if used == len(devices) else f" ({used} used)")


def table() -> str:
    rows = ["| devices | model | " + " | ".join(DTYPES) + " | `auto` picks |",
            "|---|---|" + "---|" * (len(DTYPES) + 1)]
    for set_label, devices in DEVICE_SETS.items():
        for size, (model, published) in MODELS.items():
            cells = [cell(model, devices, dtype) for dtype in DTYPES]
            auto = next((d for d, c in zip(DTYPES, cells) if not c.startswith("no")), "nothing fits")
            rows.append(f"| {set_label} | {size} ({published}) | " + " | ".join(cells) + f" | {auto} |")
            print(rows[-1], file=sys.stderr, flush=True)
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--check", action="store_true", help="exit 1 if the README's table differs")
    args = parser.parse_args()
    text = args.readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{args.readme} has no fit-table markers: add the lines {START!r} and {END!r}")
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    updated = f"{before}{START}\n{table()}\n{END}{after}"
    if args.check:
        return 0 if updated == text else 1
    args.readme.write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
