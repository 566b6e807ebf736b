"""Devices leaving a real run: agent and coordinator processes killed with SIGKILL, real sockets.

The adapters of interrupted runs must equal the adapter of an uninterrupted run with the same seed.
"""
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from safetensors.torch import load_file

from coordinator.discovery.mdns import MdnsDiscovery
from edge_runtime.data.dataset import OwnerData, read_records
from edge_runtime.local_ring import train_ring_in_process
from edge_runtime.models.lora import LoraSpec, apply_lora
from edge_runtime.models.registry import load_model, load_tokenizer
from ringtune.optimizer_spec import OptimizerSpec
from ringtune.plan import Plan
from ringtune.privacy_spec import PrivacySpec

from helpers import TOKEN, AgentProcess, ringtune_command, write_text_data
from reference import max_difference

pytestmark = pytest.mark.slow
# A heartbeat of 5 s: at 2 s a loaded machine (CI) makes a healthy agent miss one, and the run re-plans.
SHAPE = ["--model", "tiny-llama", "--steps", "12", "--checkpoint-every", "4", "--micro-batches", "4",
         "--micro-batch-size", "2", "--seq-len", "32", "--lr", "0.01", "--lora-r", "4", "--lora-alpha", "8",
         "--seed", "11", "--split", "even", "--heartbeat-timeout", "5", "--token", TOKEN]


@pytest.fixture(scope="module")
def agents(tmp_path_factory):
    """owner (with the data) and node2 stay up for every test of this module."""
    root = tmp_path_factory.mktemp("agents")
    data = write_text_data(root / "train.jsonl", records=40)
    started = [AgentProcess("owner", root / "owner", data=data), AgentProcess("node2", root / "node2")]
    yield {agent.name: agent for agent in started}
    for agent in started:
        agent.stop()


def coordinator(urls, out, *extra):
    return subprocess.Popen(ringtune_command("train", "--agents", ",".join(urls), "--owner", "owner", "--out", str(out),
                                             *SHAPE, *extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process, timeout=240):
    stdout, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, stderr
    return stdout


def run_until_step(process, step):
    """Read the coordinator's progress until the step is done, then freeze the coordinator (SIGSTOP) so the
    test acts before the next checkpoint, whatever the machine's load."""
    for line in process.stdout:
        if line.startswith(f"step {step}/"):
            os.kill(process.pid, signal.SIGSTOP)
            return
    raise AssertionError(f"the run ended before step {step}: {process.communicate()[1]}")


def resume(out, agents, timeout=240) -> subprocess.CompletedProcess:
    """`ringtune train --resume OUT` over owner and node2; on a timeout, fail with everything it printed."""
    try:
        return subprocess.run(ringtune_command("train", "--resume", str(out), "--agents",
                                               f"{agents['owner'].url},{agents['node2'].url}", "--token", TOKEN),
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"the resumed run did not end within {timeout} s; it printed:\n{error.stdout}\n{error.stderr}")


def events(out, kind):
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if line.get("event") == kind]


@dataclass(frozen=True)
class Uninterrupted:
    adapter: dict
    """The adapter of the run."""
    out: Path
    """Its output directory."""
    owner_store: Path
    """The owner's copy of its checkpoints."""


def run_uninterrupted(agents, out, *extra) -> Uninterrupted:
    middle = AgentProcess("node1", out / "node1")
    try:
        finish(coordinator([agents["owner"].url, middle.url, agents["node2"].url], out, *extra))
    finally:
        middle.stop()
    lineage = json.loads((out / "run.json").read_text())["lineage"]
    return Uninterrupted(load_file(out / "adapter_model.safetensors"), out,
                         agents["owner"].log.parent / "checkpoints" / lineage)


@pytest.fixture(scope="module")
def uninterrupted(agents, tmp_path_factory):
    return run_uninterrupted(agents, tmp_path_factory.mktemp("uninterrupted"))


PRIVACY = "dchi:epsilon=2,clip=50,seed=7"
PRIVATE = ["--privacy", PRIVACY, "--grad-privacy", "maxnorm"]


@pytest.fixture(scope="module")
def private_reference(uninterrupted, tmp_path_factory):
    """The private run's adapter trained in one process: the in-process ring over the uninterrupted run's plan,
    privatizing at its cuts with the same seeded noise."""
    data = write_text_data(tmp_path_factory.mktemp("data") / "train.jsonl", records=40)  # the agents' data
    owner_data = OwnerData(read_records(data), load_tokenizer("tiny-llama"), 2, 32, 4, seed=11)
    plan = Plan.from_json((uninterrupted.out / "plan.json").read_text())
    return train_ring_in_process(apply_lora(load_model("tiny-llama"), LoraSpec(4, 8, seed=11)), plan, owner_data,
                                 OptimizerSpec(lr=0.01), 12, PrivacySpec.parse(PRIVACY, "maxnorm")).adapter


def test_a_middle_agent_killed_at_step_6_the_run_finishes_on_the_others_exactly(agents, uninterrupted, tmp_path):
    middle = AgentProcess("node1", tmp_path / "node1")
    process = coordinator([agents["owner"].url, middle.url, agents["node2"].url], tmp_path)
    try:
        run_until_step(process, 6)
        middle.process.kill()
        middle.process.wait()
        os.kill(process.pid, signal.SIGCONT)
        stdout = finish(process)
    finally:
        process.kill()
        middle.stop()
    assert "node1 is gone" in stdout and "recovered in" in stdout, stdout
    failed, = events(tmp_path, "failed")
    recovered, = events(tmp_path, "recovered")
    assert failed["agent"] == "node1" and failed["resume_at_step"] == 4 and failed["steps_replayed"] == 2
    assert recovered["devices"] == ["owner", "node2"] and recovered["recover_seconds"] < 60
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert {stage["device"] for stage in plan["stages"]} == {"owner", "node2"}
    assert max_difference(load_file(tmp_path / "adapter_model.safetensors"), uninterrupted.adapter) < 1e-5


def test_an_agent_restarted_at_step_6_leaves_and_is_taken_back_at_the_next_checkpoint(agents, uninterrupted, tmp_path):
    """--rebalance: node1 restarts on its address between two heartbeats (its session is lost: it has left);
    the run goes on without it from checkpoint 4 and takes it back at checkpoint 8, in its place: the ring is
    the one it left, so every agent still holds its slice and nothing is shipped again."""
    middle = AgentProcess("node1", tmp_path / "node1")
    url = middle.url
    # The coordinator stays frozen while node1 restarts (seconds under load): a status call pending across the
    # freeze must not time out, or a healthy agent is declared gone too. node1's loss is seen at once anyway
    # (its session is gone), not by a missed heartbeat.
    process = coordinator([agents["owner"].url, url, agents["node2"].url], tmp_path, "--rebalance",
                          "--heartbeat-timeout", "15")
    try:
        run_until_step(process, 6)
        middle.stop()
        middle = AgentProcess("node1", tmp_path / "node1", listen=url)
        assert middle.url == url  # back, listening at its address, before the coordinator goes on
        os.kill(process.pid, signal.SIGCONT)
        stdout = finish(process)
    finally:
        process.kill()
        middle.stop()
    failed, = events(tmp_path, "failed")
    assert failed["agent"] == "node1" and failed["resume_at_step"] == 4
    rejoined, = events(tmp_path, "rejoined")
    assert rejoined["agent"] == "node1" and "node1 is back" in stdout
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["stages"] == json.loads((uninterrupted.out / "plan.json").read_text())["stages"]
    assert [stage["device"] for stage in plan["stages"]] == ["owner", "node1", "node2", "owner"]
    assert "shipping to" not in stdout.split("node1 is back")[1], stdout
    assert max_difference(load_file(tmp_path / "adapter_model.safetensors"), uninterrupted.adapter) < 1e-5


def test_a_device_back_at_a_new_address_is_found_by_discovery_and_only_named_devices_are_taken_in(
        uninterrupted, tmp_path):
    """--discover NAMES --rebalance over loopback mDNS: the helper is killed at step 6, the run goes on alone from
    checkpoint 4; the helper comes back at a new address (same name) and another agent (not named) appears, both
    advertising with the token: at checkpoint 8 the helper is taken in, the other never is. The heartbeat
    timeout exceeds the few seconds the coordinator is frozen while the agents start and are seen advertising
    (a call pending across the freeze would time out)."""
    tag = uuid.uuid4().hex[:6]  # other runs may advertise on loopback too
    data = write_text_data(tmp_path / "train.jsonl", records=40)
    owner = AgentProcess(f"own-{tag}", tmp_path / "owner", data=data, interfaces=("127.0.0.1",))
    helpers = [AgentProcess(f"pi-{tag}", tmp_path / "pi", interfaces=("127.0.0.1",))]
    process = subprocess.Popen(ringtune_command("train", "--discover", f"own-{tag},pi-{tag}", "--interface", "127.0.0.1",
                                                "--out", str(tmp_path / "run"), "--rebalance", *SHAPE,
                                                "--heartbeat-timeout", "8"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with MdnsDiscovery(interfaces=["127.0.0.1"]) as discovery:
            run_until_step(process, 6)
            helpers[0].process.kill()
            helpers.append(AgentProcess(f"pi-{tag}", tmp_path / "pi-again", interfaces=("127.0.0.1",)))
            helpers.append(AgentProcess(f"new-{tag}", tmp_path / "new", interfaces=("127.0.0.1",)))
            deadline = time.monotonic() + 30  # both advertised before the coordinator goes on
            while {a.control_url for a in discovery.table.seen()[1]} < {helpers[1].url, helpers[2].url}:
                assert time.monotonic() < deadline, "the new agents were not seen advertising"
                time.sleep(0.2)
        os.kill(process.pid, signal.SIGCONT)
        stdout = finish(process)
    finally:
        process.kill()
        for agent in (owner, *helpers):
            agent.stop()
    failures = events(tmp_path / "run", "failed")
    assert len(failures) == 1, (failures, stdout)  # only the helper that was killed
    failed, = failures
    joined, = events(tmp_path / "run", "joined")
    assert failed["agent"] == f"pi-{tag}" and failed["resume_at_step"] == 4
    assert joined["agent"] == f"pi-{tag}" and joined["url"] == helpers[1].url and "found by discovery" in stdout
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert {stage["device"] for stage in plan["stages"]} == {f"own-{tag}", f"pi-{tag}"}  # never new-{tag}
    assert max_difference(load_file(tmp_path / "run" / "adapter_model.safetensors"), uninterrupted.adapter) < 1e-5


def test_resume_uses_the_previous_checkpoint_when_the_newest_is_corrupt(agents, uninterrupted, tmp_path):
    """The finished uninterrupted run's newest checkpoint (step 8) corrupted here and on the owner: resume
    (over two agents) takes step 4's and ends with the same adapter."""
    out = tmp_path / "run"
    shutil.copytree(uninterrupted.out, out, ignore=shutil.ignore_patterns("node1"))
    for store in (out / "checkpoints", uninterrupted.owner_store):
        newest = store / "step-00000008.safetensors"
        newest.write_bytes(newest.read_bytes()[:-100] + bytes(100))
    resumed = resume(out, agents)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from the checkpoint of step 4" in resumed.stdout, resumed.stdout
    assert max_difference(load_file(out / "adapter_model.safetensors"), uninterrupted.adapter) < 1e-5


def test_a_private_run_with_a_middle_agent_killed_then_its_coordinator_killed_and_resumed_ends_exactly(
        agents, private_reference, uninterrupted, tmp_path):
    """Private runs restore exactly: checkpoints hold the owner's AdamW state, and the noise is keyed by (seed,
    step, micro-batch, stage), so the steps replayed after node1 is killed at step 6 (from checkpoint 4), and
    after the coordinator is killed at step 10 and resumed (from checkpoint 8, without the seed: run.json does
    not hold it, the owner kept it), draw the noise an uninterrupted private ring draws (computed in one process)."""
    middle = AgentProcess("node1", tmp_path / "node1")
    urls = [agents["owner"].url, middle.url, agents["node2"].url]
    process = coordinator(urls, tmp_path, *PRIVATE)
    try:
        run_until_step(process, 6)
        middle.process.kill()
        middle.process.wait()
        os.kill(process.pid, signal.SIGCONT)
        run_until_step(process, 10)
        process.kill()
        process.wait()
        assert '"seed"' not in json.dumps(json.loads((tmp_path / "run.json").read_text())["settings"]["privacy"])
        resumed = resume(tmp_path, agents)
    finally:
        process.kill()
        middle.stop()
    assert resumed.returncode == 0, resumed.stderr
    failed, = events(tmp_path, "failed")
    assert failed["agent"] == "node1" and failed["steps_replayed"] == 2
    assert "resuming from the checkpoint of step 8" in resumed.stdout and "step 12/12" in resumed.stdout
    adapter = load_file(tmp_path / "adapter_model.safetensors")
    assert max_difference(adapter, private_reference) < 1e-5
    assert max_difference(private_reference, uninterrupted.adapter) > 1e-4, "the noise changed nothing"
