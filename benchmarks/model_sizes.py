"""How big a model can I fine-tune? The planner's answer for common device sets, model sizes and base dtypes.

    python benchmarks/model_sizes.py [--write-readme]

Every cell is one ``ringtune plan --model-config benchmarks/configs/MODEL/config.json --device ...
--base-dtype DTYPE --json`` (configs only: no weights, no hub), at the demo's shape (4 micro-batches
of 4 x 64 tokens, 1F1B, LoRA r=8 on every linear layer). A plan that fits gives the devices it uses
and its predicted tokens/s; one that does not, the GB it needs against the GB the devices have.
Writes benchmarks/results/model_sizes.json and prints the markdown table; --write-readme replaces
the table in README.md (between the model-sizes markers).
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).parents[1]
CONFIGS = Path(__file__).parent / "configs"
RESULTS = Path(__file__).parent / "results"
MODELS = {"135M": "smollm2-135m", "0.5B": "qwen2.5-0.5b", "1.1B": "llama-1.1b", "3B": "llama-3.2-3b",
          "7B": "llama-2-7b"}
DEVICE_SETS = {
    "3 x rpi4-4gb": ["rpi4-4gb:pi-1", "rpi4-4gb:pi-2", "rpi4-4gb:pi-3"],
    "4 x rpi5-8gb": [f"rpi5-8gb:pi-{i}" for i in range(1, 5)],
    "8 x rpi5-8gb": [f"rpi5-8gb:pi-{i}" for i in range(1, 9)],
    "laptop + 2 x rpi5-8gb": ["laptop:laptop", "rpi5-8gb:pi-1", "rpi5-8gb:pi-2"],
}
DTYPES = ("fp32", "bf16", "int8", "int4")
SHAPE = ["--micro-batch-size", "4", "--seq-len", "64", "--micro-batches", "4", "--schedule", "1f1b"]
BEGIN, END = "<!-- model-sizes:begin -->", "<!-- model-sizes:end -->"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write-readme", action="store_true")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    cells = [(size, dtype, devices) for size in MODELS for dtype in DTYPES for devices in DEVICE_SETS]
    with ThreadPoolExecutor(args.workers) as pool:
        answers = list(pool.map(lambda cell: plan(*cell), cells))
    results = [{"model": size, "config": MODELS[size], "base_dtype": dtype, "devices": devices, **answer}
               for (size, dtype, devices), answer in zip(cells, answers)]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "model_sizes.json").write_text(json.dumps({"shape": SHAPE, "results": results}, indent=1))
    text = table(results)
    print(text)
    if args.write_readme:
        readme = ROOT / "README.md"
        before, rest = readme.read_text().split(BEGIN)
        _, after = rest.split(END)
        readme.write_text(f"{before}{BEGIN}\n{text}\n{END}{after}")


def plan(size: str, dtype: str, devices: str) -> dict:
    argv = [sys.executable, "-m", "ringtune.cli", "plan", "--model-config", str(CONFIGS / MODELS[size] / "config.json"),
            *(a for d in DEVICE_SETS[devices] for a in ("--device", d)), "--base-dtype", dtype, *SHAPE, "--json"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    if done.returncode == 0:
        plan = json.loads(done.stdout)
        used = list(dict.fromkeys(stage["device"] for stage in plan["stages"]))
        memory = plan["predicted"]["memory_bytes"]
        return {"fits": True, "devices_used": used, "tokens_per_second": plan["predicted"]["tokens_per_second"],
                "peak_gb": max(memory.values()) / 1e9}
    error = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "no output"
    if "error:" not in error:
        raise RuntimeError(f"ringtune plan failed unexpectedly for {size} {dtype} on {devices}:\n{done.stderr}")
    return {"fits": False, "error": error.split("error: ", 1)[1]}


def cell(result: dict) -> str:
    if result["fits"]:
        count = len(result["devices_used"])
        return f"yes: {count} device{'s' * (count > 1)}, {result['tokens_per_second']:.1f} tok/s"
    needs = re.search(r"needs at least ([\d.]+ GB)", result["error"])
    has = re.search(r"have ([\d.]+ GB) together", result["error"])
    if needs and has:
        return f"no: needs {needs.group(1)}, has {has.group(1)}"
    return "no: no split into whole blocks fits" if "no split" in result["error"] else "no"


def table(results: list[dict]) -> str:
    lines = ["| model | base dtype | " + " | ".join(DEVICE_SETS) + " |", "|---|---|" + "---|" * len(DEVICE_SETS)]
    for size in MODELS:
        for dtype in DTYPES:
            row = {r["devices"]: r for r in results if r["model"] == size and r["base_dtype"] == dtype}
            lines.append(f"| {size} | {dtype} | " + " | ".join(cell(row[d]) for d in DEVICE_SETS) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
