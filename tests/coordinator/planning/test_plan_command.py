"""``ringtune plan`` through the real command line."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ringtune.plan import Plan, validate_plan

LLAMA_7B = Path(__file__).parent / "data" / "llama-2-7b" / "config.json"
EIGHT_PI5 = [arg for i in range(8) for arg in ("--device", f"rpi5-8gb:pi-{i}")]


def ringtune(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ringtune.cli", *args], capture_output=True, text=True,
                          timeout=120)


def test_plan_table():
    result = ringtune("plan", "--model-config", str(LLAMA_7B), *EIGHT_PI5, "--owner", "pi-0")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:4] == ["stage", "device", "role", "layers"]
    assert "pi-0" in lines[1] and "head" in lines[1] and "/ 7.00 GB" in lines[1]
    assert "predicted step:" in result.stdout and "tokens/s" in result.stdout


def test_plan_json_and_device_file(tmp_path):
    devices = tmp_path / "devices.toml"
    devices.write_text('[[device]]\nname = "pi-a"\nram_gb = 3\ncores = 4\ngflops = 10\nlink_mbit_s = 940\n'
                       '[[device]]\nname = "box"\nram_gb = 8\ncores = 8\ngflops = 80\nlink_mbit_s = 940\n')
    result = ringtune("plan", "--model", "tiny-llama", "--device-file", str(devices), "--json",
                      "--micro-batches", "8")
    assert result.returncode == 0, result.stderr
    plan = Plan.from_json(result.stdout)
    validate_plan(plan, 4)
    assert plan.owner == "pi-a" and plan.model == "tiny-llama" and plan.micro_batches == 8
    assert plan.predicted["step_seconds"] > 0


def test_plan_over_tiny_gemma3():
    result = ringtune("plan", "--model", "tiny-gemma3", "--device", "rpi4-4gb:pi-a", "--device", "rpi4-4gb:pi-b",
                      "--json", "--seq-len", "24")
    assert result.returncode == 0, result.stderr
    plan = Plan.from_json(result.stdout)
    validate_plan(plan, 4)
    assert plan.model == "tiny-gemma3" and plan.predicted["step_seconds"] > 0


def test_plan_that_does_not_fit_exits_2_with_one_line():
    result = ringtune("plan", "--model-config", str(LLAMA_7B), "--device", "rpi4-4gb:pi-a",
                      "--device", "rpi4-4gb:pi-b")
    assert result.returncode == 2
    error = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(error) == 1 and "pi-a 3.0 GB" in error[0] and "add devices" in error[0]
