"""The coordinator's peak memory while it cuts and ships a model it never holds whole.

Writes (once) a 0.3B LLaMA-shaped model with seeded random weights (benchmarks/model_fixture.py, 1.16 GB
in fp32, one shard), then runs `ringtune train --local 3` on it for each --base-dtype with a fresh slice
cache, so every slice is cut: the agents are separate processes; the coordinator's high-water mark
(VmHWM, sampled until it exits) is compared with the bound of issue 13: half the model's fp32 bytes
plus 450 MB. Also records how long cutting and shipping took (from the coordinator's plain progress
lines) and the slice sizes.

    .venv/bin/python benchmarks/coordinator_memory.py [--dtypes fp32,int8] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from model_fixture import write_fixture  # noqa: E402
from edge_runtime.memory import peak_rss  # noqa: E402

MB = 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", default="fp32,int8")
    parser.add_argument("--size", default="0.3b")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "ringtune-bench")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "coordinator_memory.json")
    args = parser.parse_args()
    model = write_fixture(args.size, args.workdir / f"llama-{args.size}")
    fp32_bytes = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    data = args.workdir / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"record {i}: the cat sat on the mat and looked at the dog"}) + "\n"
                            for i in range(32)))
    runs = [run(model, data, dtype, args.workdir) for dtype in args.dtypes.split(",")]
    bound = fp32_bytes / 2 + 450 * MB
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "load_average": os.getloadavg(),
              "model": model.name, "model_fp32_bytes": fp32_bytes, "bound_bytes": bound,
              "bound": "half the model's fp32 bytes + 450 MB (issue 13)", "runs": runs,
              "within_bound": all(r["coordinator_peak_rss"] < bound for r in runs)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


def run(model: Path, data: Path, dtype: str, workdir: Path) -> dict:
    out = workdir / f"run-{dtype}"
    env = {**os.environ, "RINGTUNE_CACHE": str(workdir / f"cache-{dtype}-{time.time_ns()}"),
           "RINGTUNE_STATE": str(workdir / f"state-{time.time_ns()}")}
    command = [sys.executable, "-m", "ringtune.cli", "train", "--model", str(model), "--local", "3",
               "--data", str(data), "--out", str(out), "--steps", "1", "--micro-batches", "2",
               "--micro-batch-size", "1", "--seq-len", "32", "--split", "even", "--base-dtype", dtype,
               "--threads", "1"]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    peak = 0
    while process.poll() is None:
        try:
            peak = max(peak, peak_rss(process.pid))
        except (OSError, RuntimeError):
            pass  # exiting
        time.sleep(0.05)
    output = process.stdout.read()
    if process.returncode != 0:
        raise SystemExit(f"ringtune train --base-dtype {dtype} failed:\n{output}")
    return {"base_dtype": dtype, "coordinator_peak_rss": peak, "seconds": time.perf_counter() - started,
            "cut_seconds": _seconds(output, r"cutting .* slices .*: done, .* in ([\d.]+) s"),
            "ship_seconds": {name: float(s) for name, s in re.findall(r"shipping to (\S+): done, .* in ([\d.]+) s", output)},
            "slices": re.search(r"slices ready on every agent \((.*)\)", output).group(1),
            "agents_peak_rss": json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["devices"],
            "log": output.splitlines()[-12:]}


def _seconds(output: str, pattern: str) -> float | None:
    match = re.search(pattern, output)
    return float(match.group(1)) if match else None


if __name__ == "__main__":
    sys.exit(main())
