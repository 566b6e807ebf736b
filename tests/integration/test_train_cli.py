"""`ringtune train` end to end: real agent subprocesses, real pynng sockets on loopback."""
import json
import re
import subprocess
import time

import psutil
import pytest
from safetensors.torch import load_file

from helpers import ARCHITECTURES, ringtune_command, write_text_data
from coordinator.run_store import step_records
from coordinator.timeline import lanes
from edge_runtime.data.dataset import OwnerData, read_records, scored_share
from edge_runtime.models.lora import LoraSpec
from edge_runtime.models.registry import load_config, load_model, load_tokenizer
from ringtune.optimizer_spec import OptimizerSpec
from ringtune.wire import payload_bytes
from reference import assert_peft_reproduces_the_trained_model, dequantized_tolerance, max_difference, reference_adapter

pytestmark = pytest.mark.slow
SHAPE = ["--steps", "3", "--micro-batches", "4", "--micro-batch-size", "2", "--seq-len", "24",
         "--lr", "0.01", "--lora-r", "4", "--lora-alpha", "8", "--seed", "11", "--split", "even"]


def train(*args, timeout=300):
    result = subprocess.run(ringtune_command("train", *args), capture_output=True, text=True, timeout=timeout)
    return result


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_text_data(tmp_path_factory.mktemp("data") / "train.jsonl", records=40)


@pytest.fixture(scope="module")
def single_process(tmp_path_factory, data):
    """`--local 1` adapters per architecture (the whole model on the owner)."""
    adapters = {}
    for name in ARCHITECTURES:
        out = tmp_path_factory.mktemp(f"local1-{name}")
        result = train("--model", name, "--local", "1", "--data", str(data), "--out", str(out), *SHAPE)
        assert result.returncode == 0, result.stderr
        adapters[name] = load_file(out / "adapter_model.safetensors")
    return adapters


# Every architecture under 1F1B; GPipe (sealed frames) on one: schedules and sealing do not depend on the architecture.
@pytest.mark.parametrize(("name", "schedule"), [(name, "1f1b") for name in ARCHITECTURES] + [(ARCHITECTURES[0], "gpipe")])
def test_three_agent_ring_equals_one_agent_and_plain_peft_and_loads_in_peft(name, schedule, data, single_process, tmp_path):
    encrypt = ["--encrypt"] if schedule == "gpipe" else []  # sealing mode must not change a single bit
    timeline = ["--timeline"] if (name, schedule) == (ARCHITECTURES[0], "1f1b") else []  # drawing changes nothing
    result = train("--model", name, "--local", "3", "--data", str(data), "--schedule", schedule,
                   "--out", str(tmp_path), *SHAPE, *encrypt, *timeline)
    assert result.returncode == 0, result.stderr
    if timeline:
        assert_the_timeline_shows_where_each_stage_spent_the_step(result.stdout, tmp_path)
    assert "step 3/3" in result.stdout and "tokens/s" in result.stdout
    ring = load_file(tmp_path / "adapter_model.safetensors")
    assert max_difference(ring, single_process[name]) < 1e-5
    owner_data = OwnerData(read_records(data), load_tokenizer(name), 2, 24, 4, seed=11)
    reference = reference_adapter(name, LoraSpec(4, 8, seed=11), OptimizerSpec(lr=0.01), owner_data, 3)
    assert max_difference(ring, reference) < 1e-5
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert [s["device"] for s in plan["stages"]] == ["owner", "node1", "node2", "owner"]
    metrics = step_records(tmp_path)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(m["devices"]["node1"]["bytes_sent"] > 0 for m in metrics)
    for device in ("owner", "node1", "node2"):  # the CPU each agent used in the step, and the pages it touched anew
        assert all(0 < m["devices"][device]["cpu_seconds"] < 2 * m["step_seconds"] for m in metrics)
        assert all(m["devices"][device]["page_faults"] > 0 for m in metrics)
    assert_peft_reproduces_the_trained_model(name, tmp_path)


def assert_the_timeline_shows_where_each_stage_spent_the_step(stdout: str, tmp_path) -> None:
    """--timeline draws a step beside metrics.jsonl; every stage's compute, wait and send fit in its agent's step,
    which fits in the coordinator's, and its spans (one F and one B per micro-batch) follow each other inside it."""
    assert f"timeline: {tmp_path / 'timeline.png'}" in stdout
    assert (tmp_path / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for record in step_records(tmp_path):
        stages = lanes(record)
        assert [lane.label for lane in stages] == ["owner head", "node1", "node2", "owner tail"]
        for lane in stages:
            t, spans = lane.timing, lane.timing.spans
            assert sorted((s.kind, s.microbatch) for s in spans) == [(k, mb) for k in "BF" for mb in range(4)]
            assert 0 <= spans[0].start and all(s.start < s.end <= n.start for s, n in zip(spans, spans[1:]))
            assert spans[-1].end <= t.wall_seconds <= record["step_seconds"]
            assert sum(s.end - s.start for s in spans) <= t.compute_seconds + 1e-9
            assert t.compute_seconds + t.wait_seconds + t.send_seconds <= t.wall_seconds + 1e-9
        assert stages[1].timing.wait_seconds > 0 and stages[1].timing.send_seconds > 0  # a helper gets and sends frames


def test_int8_base_weights_on_three_agents_train_like_plain_peft_and_load_in_peft(data, tmp_path, monkeypatch):
    """Slices cut and quantized by the coordinator, computed with on the agents: the adapter equals plain peft on
    the dequantized weights (to int8's rounding order, dequantized_tolerance), says what dtype was chosen, and
    loads in peft on the fp32 base model."""
    from peft import PeftModel

    monkeypatch.setenv("RINGTUNE_CACHE", str(tmp_path / "cache"))  # slices are cut and shipped, not found in a
    monkeypatch.setenv("RINGTUNE_STATE", str(tmp_path / "state"))  # cache
    name = "tiny-llama"
    result = train("--model", name, "--local", "3", "--data", str(data), "--base-dtype", "int8",
                   "--out", str(tmp_path / "run"), *SHAPE)
    assert result.returncode == 0, result.stderr
    assert "base weights: int8 (asked for with --base-dtype int8)" in result.stdout
    assert "cutting int8 slices for owner, node1, node2: done, 4/4 blocks" in result.stdout
    assert "shipping to node1: done" in result.stdout
    assert "loading stages on owner, node1, node2: done, 3/3 agents in" in result.stdout
    ring = load_file(tmp_path / "run" / "adapter_model.safetensors")
    owner_data = OwnerData(read_records(data), load_tokenizer(name), 2, 24, 4, seed=11)
    reference = reference_adapter(name, LoraSpec(4, 8, seed=11), OptimizerSpec(lr=0.01), owner_data, 3,
                                  base_dtype="int8")
    assert max_difference(ring, reference) < dequantized_tolerance("int8")  # another rounding order than peft's
    assert json.loads((tmp_path / "run" / "plan.json").read_text())["base_dtype"] == "int8"
    loaded = PeftModel.from_pretrained(load_model(name), str(tmp_path / "run"))
    assert any(float(t.abs().max()) > 0 for n, t in loaded.state_dict().items() if "lora_B" in n)


def assert_clean_failure(result, *fragments):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_unknown_model(tmp_path, data):
    assert_clean_failure(train("--model", "gpt-17", "--local", "1", "--data", str(data), "--out", str(tmp_path)),
                         "unknown model 'gpt-17'", "tiny-llama")


def test_missing_data_file(tmp_path):
    assert_clean_failure(train("--model", "tiny-llama", "--local", "2", "--data", str(tmp_path / "no.jsonl"),
                               "--out", str(tmp_path)), "no.jsonl does not exist")


def test_malformed_data_names_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "ok"}\n{"txet": 3}\n')
    assert_clean_failure(train("--model", "tiny-llama", "--local", "2", "--data", str(bad), "--out", str(tmp_path)),
                         "bad.jsonl:3:")


def test_agent_url_nobody_listens_on(tmp_path):
    started = time.monotonic()
    result = train("--model", "tiny-llama", "--agents", "tcp://127.0.0.1:9", "--owner", "x",
                   "--heartbeat-timeout", "2", "--token", "some-token-0123456789", "--out", str(tmp_path))
    assert_clean_failure(result, "tcp://127.0.0.1:9", "did not answer")
    assert time.monotonic() - started < 30


def test_more_devices_than_blocks(tmp_path, data):
    assert_clean_failure(train("--model", "tiny-llama", "--local", "5", "--data", str(data), "--split", "even",
                               "--out", str(tmp_path)), "5 devices but the model has only 4 blocks")


def test_owner_killed_mid_run_pauses_the_run_then_stops_it_with_advice(tmp_path, data):
    """Without the owner (and its data) nothing can run: the run waits --pause-timeout for it, then stops."""
    process = subprocess.Popen(ringtune_command("train", "--model", "tiny-llama", "--local", "3", "--data", str(data),
                                                "--out", str(tmp_path), "--steps", "100000", "--seq-len", "16",
                                                "--split", "even", "--pause-timeout", "3"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in process.stdout:
            if line.startswith("step 2/"):
                break
        victim = next(p for p in psutil.Process(process.pid).children()
                      if "owner" in p.cmdline())
        victim.kill()
        killed_at = time.monotonic()
        _, stderr = process.communicate(timeout=60)
        detected_in = time.monotonic() - killed_at
    finally:
        process.kill()
    assert process.returncode != 0
    assert "owner" in stderr and "killed by signal 9" in stderr and "--resume" in stderr, stderr
    assert "Traceback" not in stderr
    assert detected_in < 30  # heartbeat (5 s) + pause (3 s) + stopping the others, on a loaded machine
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])
                and "agent" in (p.info["cmdline"] or [])], "local agents were left running"


def test_local_agents_end_with_a_killed_coordinator(tmp_path, data):
    """SIGKILL leaves the coordinator no chance to stop its --local agents: the kernel ends them (PR_SET_PDEATHSIG)."""
    process = subprocess.Popen(ringtune_command("train", "--model", "tiny-llama", "--local", "2", "--data", str(data),
                                                "--out", str(tmp_path), "--steps", "100000", "--seq-len", "16"),
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in process.stdout:
            if line.startswith("step 1/"):
                break
        agents = psutil.Process(process.pid).children()
        assert len(agents) == 2 and all("agent" in agent.cmdline() for agent in agents)
    finally:
        process.kill()
        process.wait()
    _, alive = psutil.wait_procs(agents, timeout=30)
    assert not alive, f"local agents outlived their coordinator: {[a.cmdline() for a in alive]}"


def test_the_planner_uses_each_agents_measured_block_time(tmp_path, data):
    shape = SHAPE[:SHAPE.index("--split")]  # planned, not even
    result = train("--model", "tiny-llama", "--local", "2", "--data", str(data), "--out", str(tmp_path), *shape,
                   "--wire", "int8")
    assert result.returncode == 0, result.stderr
    timed = re.search(r"^one block forward \+ backward \((\w+) weights\): (.*)$", result.stdout, re.MULTILINE)
    assert timed, result.stdout
    assert "owner" in timed[2] and "node1" in timed[2] and " ms" in timed[2]
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["predicted"]["step_seconds"] > 0
    assert timed[1] == plan["base_dtype"]  # timed at the dtype the plan runs
    # the owner told the planner its data's share of scored positions (a number, computed on the owner)
    share = scored_share(read_records(data), load_tokenizer("tiny-llama"), 24)
    assert f"the owner's data: {share:.1%} of the positions are scored" in result.stdout
    # --wire int8: hidden states in int8 (a token's outliers in bf16), gradients in bf16; the helper sends one
    # of each per micro-batch (4 of 2 x 24 tokens)
    if any(stage["device"] == "node1" for stage in plan["stages"]):  # the planner may keep a tiny model on the owner
        hidden = load_config("tiny-llama").hidden_size
        payload = 4 * (payload_bytes("int8", 2 * 24, hidden) + payload_bytes("bf16", 2 * 24, hidden))
        sent = step_records(tmp_path)[0]["devices"]["node1"]["bytes_sent"]
        assert payload < sent < payload + 8 * 300  # and each frame's header and MAC
