"""``ringtune plan`` through the real command line."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ringtune.plan import Plan, validate_plan
from ringtune.privacy_spec import PRESETS

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
    assert "pi-0" in lines[1] and "head" in lines[1]
    assert "predicted step:" in result.stdout and "tokens/s" in result.stdout
    # per device: the predicted peak against its RAM, and what makes it up
    memory = lines[next(i for i, line in enumerate(lines) if line.split()[:2] == ["device", "predicted"]):]
    assert "runtime" in memory[0] and "activations" in memory[0]
    rows = {line.split()[0]: line.split() for line in memory[1:] if line.startswith("pi-")}
    assert set(rows) == {f"pi-{i}" for i in range(8)}
    for row in rows.values():
        peak, ram = float(row[1]), float(row[3])
        assert row[2] == "/" and ram == 7.0 and 0.45 < peak <= ram
        assert float(row[6]) > 2.0  # weights: 6.7 B parameters in fp32 over 8 devices


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


def test_base_dtype_auto_takes_the_widest_that_fits_and_says_why():
    four = [arg for i in range(4) for arg in ("--device", f"rpi5-8gb:pi-{i}")]
    auto = ringtune("plan", "--model-config", str(LLAMA_7B), *four, "--owner", "pi-0", "--json")
    assert auto.returncode == 0, auto.stderr
    plan = Plan.from_json(auto.stdout)
    assert plan.base_dtype == "bf16"
    assert plan.base_dtype_reason == "it does not fit these devices at fp32; bf16 is the widest dtype that fits"
    two = ringtune("plan", "--model-config", str(LLAMA_7B), *four[:4], "--owner", "pi-0")
    assert "base weights: int8 (it does not fit these devices at fp32, bf16; int8 is the widest dtype" in two.stdout
    forced = ringtune("plan", "--model-config", str(LLAMA_7B), *four, "--owner", "pi-0", "--base-dtype", "fp32")
    assert forced.returncode == 2 and "Traceback" not in forced.stderr
    assert "needs at least 30.8 GB" in forced.stderr and "it fits at --base-dtype bf16 (or auto)" in forced.stderr
    fits = ringtune("plan", "--model-config", str(LLAMA_7B), *EIGHT_PI5, "--owner", "pi-0", "--json")
    assert Plan.from_json(fits.stdout).base_dtype == "fp32"


def test_compact_dtypes_price_less_memory_per_device():
    memory = {}
    for dtype in ("fp32", "bf16", "int8", "int4"):
        result = ringtune("plan", "--model-config", str(LLAMA_7B), *EIGHT_PI5, "--owner", "pi-0", "--json",
                          "--base-dtype", dtype)
        assert result.returncode == 0, result.stderr
        plan = Plan.from_json(result.stdout)
        assert plan.base_dtype == dtype and plan.base_dtype_reason == f"asked for with --base-dtype {dtype}"
        memory[dtype] = sum(plan.predicted["memory_bytes"].values())
    assert memory["fp32"] > memory["bf16"] > memory["int8"] > memory["int4"]


def test_plan_prices_the_wire_codec_and_the_scored_share_as_train_does():
    phones = [arg for name in ("a", "b", "c") for arg in ("--device", f"phone-mid:{name}")]  # 300 Mbit/s WiFi

    def plan(*extra: str) -> Plan:
        result = ringtune("plan", "--model", "smollm2-135m", *phones, "--micro-batch-size", "4", "--json", *extra)
        assert result.returncode == 0, result.stderr
        return Plan.from_json(result.stdout)

    fp32, int8 = plan("--wire", "fp32"), plan("--wire", "int8")
    assert sum(int8.predicted["stage_link_seconds"]) < 0.4 * sum(fp32.predicted["stage_link_seconds"])
    tail = len(fp32.stages) - 1
    assert plan("--wire", "fp32", "--scored-share", "0.05").predicted["stage_compute_seconds"][tail] < \
        fp32.predicted["stage_compute_seconds"][tail]  # the LM head and loss run on 5% of the positions
    table = ringtune("plan", "--model", "smollm2-135m", *phones, "--wire", "auto")
    assert "wire: bf16; the loss scores 100% of positions" in table.stdout, table.stdout  # auto: a link under 1 Gbit/s
    refused = ringtune("plan", "--model", "smollm2-135m", *phones, "--scored-share", "0")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "in (0, 1]" in refused.stderr


def test_plan_with_withheld_gradients_prices_forward_only_stages():
    """--grad-privacy withhold: the stages before the owner's tail run forward only, so the helpers hold no LoRA
    gradients, AdamW state or activations and the step is predicted faster (a forward is about half of a forward
    and a backward); the plan records it, and --privacy strong (which withholds) keeps its owner blocks."""
    def plan(*extra: str) -> subprocess.CompletedProcess:
        result = ringtune("plan", "--model-config", str(LLAMA_7B), *EIGHT_PI5, "--owner", "pi-0", *extra)
        assert result.returncode == 0, result.stderr
        return result

    training, withheld = (Plan.from_json(plan("--json", *extra).stdout) for extra in ((), ("--grad-privacy", "withhold")))
    assert withheld.privacy["gradient"] == "withhold" and not training.privacy
    helpers = [s.device for s in withheld.stages[1:-1]]
    assert helpers and all(withheld.predicted["memory"][name]["trainable"] == 0 and
                           withheld.predicted["memory"][name]["activations"] == 0 for name in helpers)
    assert withheld.predicted["step_seconds"] < 0.6 * training.predicted["step_seconds"]
    strong = plan("--privacy", "strong").stdout
    assert f"pi-0    head    [0, {PRESETS['strong'].owner_blocks})" in strong and "gradients withheld (only the owner's tail trains)" in strong
