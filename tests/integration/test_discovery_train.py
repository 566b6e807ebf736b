"""Agents found over mDNS and trained through, on loopback and across network namespaces (root)."""
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
from safetensors.torch import load_file

from edge_runtime.data.dataset import OwnerData, read_records
from edge_runtime.models.lora import LoraSpec
from edge_runtime.models.registry import load_tokenizer
from helpers import TOKEN, AgentProcess, files_holding, ringtune_command, write_text_data
from reference import max_difference, reference_adapter
from ringtune.optimizer_spec import OptimizerSpec

pytestmark = pytest.mark.slow
TRAIN = ["--model", "tiny-llama", "--steps", "2", "--micro-batches", "2", "--seq-len", "16", "--split", "even",
         "--seed", "3", "--token", TOKEN]


def run(*args, prefix=(), timeout=240):
    return subprocess.run([*prefix, *ringtune_command(*args)], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def loopback_agents(tmp_path_factory):
    """An owner and a helper advertising on loopback, shared by the module's tests (each run ends by freeing them)."""
    root = tmp_path_factory.mktemp("loopback")
    data = write_text_data(root / "data.jsonl")
    tag = uuid.uuid4().hex[:6]  # other runs may advertise on loopback too
    agents = [agent.ready() for agent in (AgentProcess(f"own-{tag}", root / "a", data=data, interfaces=("127.0.0.1",)),
                                          AgentProcess(f"pi-{tag}", root / "b", interfaces=("127.0.0.1",)))]
    yield agents
    for agent in agents:
        agent.stop()


def test_devices_lists_advertised_agents_with_their_profiles(loopback_agents):
    result = run("devices", "--interface", "127.0.0.1", "--timeout", "5", "--json")
    assert result.returncode == 0, result.stderr
    listed = {d["name"]: d for d in json.loads(result.stdout)}
    owner, helper = loopback_agents
    assert listed[owner.name]["has_data"] is True and listed[helper.name]["has_data"] is False
    assert listed[owner.name]["control_url"] == owner.url
    for device in (listed[owner.name], listed[helper.name]):
        assert device["cores"] >= 1 and device["ram_bytes"] > 0 and device["gflops"] > 0
        assert device["runtime"] == "torch"


def test_train_by_discovery_equals_train_by_address(loopback_agents, tmp_path):
    owner, helper = loopback_agents
    names = f"{owner.name},{helper.name}"
    found = run("train", "--discover", names, "--interface", "127.0.0.1", "--out", str(tmp_path / "found"), *TRAIN)
    assert found.returncode == 0, found.stderr
    given = run("train", "--agents", f"{owner.url},{helper.url}", "--owner", owner.name,
                "--out", str(tmp_path / "given"), *TRAIN)
    assert given.returncode == 0, given.stderr
    assert max_difference(load_file(tmp_path / "found" / "adapter_model.safetensors"),
                          load_file(tmp_path / "given" / "adapter_model.safetensors")) == 0.0
    # the second run found every slice in the agents' caches
    assert owner.alive() and helper.alive()
    # nothing either run wrote holds the token: not the adapter, run.json, metrics, plan, checkpoints nor logs
    assert (tmp_path / "given" / "run.json").exists() and (tmp_path / "given" / "ringtune.json").exists()
    assert files_holding(tmp_path, TOKEN) == [] and files_holding(owner.log.parents[1], TOKEN) == []  # and agents'


def test_plan_over_discovered_agents(loopback_agents):
    owner, helper = loopback_agents
    result = run("plan", "--model", "smollm2-135m", "--discover", f"{owner.name},{helper.name}",
                 "--interface", "127.0.0.1", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["owner"] == owner.name and plan["stages"][0]["device"] == owner.name
    assert plan["predicted"]["step_seconds"] > 0


def test_wrong_token_is_refused_with_advice(loopback_agents, tmp_path):
    owner, helper = loopback_agents
    result = run("train", "--agents", f"{owner.url},{helper.url}", "--owner", owner.name,
                 "--out", str(tmp_path), *TRAIN[:-1], "wrong-token-but-long-enough")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "refused pairing" in result.stderr and "wrong token" in result.stderr
    assert owner.alive()


def test_discovery_timeout_names_who_is_missing(tmp_path):
    result = run("train", "--discover", "nobody-here", "--interface", "127.0.0.1", "--discover-timeout", "2",
                 "--out", str(tmp_path), *TRAIN)
    assert result.returncode != 0 and "nobody-here" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.root
def test_training_across_network_namespaces(bridged_namespaces, tmp_path):
    (ns_a, ip_a), (ns_b, ip_b), (ns_c, ip_c) = bridged_namespaces.items()
    data = write_text_data(tmp_path / "data.jsonl")
    agents = []
    try:
        agents.append(AgentProcess("ns-owner", tmp_path / "a", data=data, listen=f"tcp://{ip_a}:0",
                                   interfaces=(ip_a,), prefix=("ip", "netns", "exec", ns_a)))
        agents.append(AgentProcess("ns-pi", tmp_path / "b", listen=f"tcp://{ip_b}:0", interfaces=(ip_b,),
                                   prefix=("ip", "netns", "exec", ns_b)))
        result = run("train", "--discover", "2", "--interface", ip_c, "--out", str(tmp_path / "ns"), *TRAIN,
                     prefix=("ip", "netns", "exec", ns_c))
        assert result.returncode == 0, result.stderr
        assert "found ns-owner" in result.stderr or "found ns-pi" in result.stderr
    finally:
        for agent in agents:
            agent.stop()
    owner_data = OwnerData(read_records(data), load_tokenizer("tiny-llama"), 2, 16, 2, seed=3)
    expected = reference_adapter("tiny-llama", LoraSpec(seed=3), OptimizerSpec(), owner_data, 2)  # TRAIN in one process
    assert max_difference(load_file(tmp_path / "ns" / "adapter_model.safetensors"), expected) < 1e-5


CTRL_C_RUNS = int(os.environ.get("RINGTUNE_CTRL_C_RUNS", "2"))
"""Ctrl-C runs in a row (20 for a report: RINGTUNE_CTRL_C_RUNS=20)."""


@pytest.fixture
def cpu_hog():
    """A process spinning on a core beside the test (Ctrl-C used to hang under load)."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    yield hog
    hog.kill()
    hog.wait()


def interrupted_at_step_2(command: list[str]) -> subprocess.CompletedProcess:
    """Start a run, send SIGINT once step 2 is done; the coordinator's exit. If it does not exit within 60 s,
    its threads' stacks (faulthandler, SIGUSR1) are in the failure message: where SIGINT landed."""
    # SIGINT as from a terminal: a test run in the background (a shell's `&`) inherits it ignored
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in process.stdout:
        if line.startswith("step 2/"):
            break
    process.send_signal(signal.SIGINT)
    try:
        stdout, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGUSR1)
        time.sleep(2)
        process.kill()
        stdout, stderr = process.communicate()
        raise AssertionError(f"the coordinator hung after Ctrl-C; its stacks:\n{stderr[-20000:]}") from None
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def test_ctrl_c_stops_the_run_and_leaves_agents_ready(loopback_agents, cpu_hog, tmp_path):
    from coordinator.client import AgentClient
    from ringtune.protocol import Status

    owner, helper = loopback_agents
    for attempt in range(CTRL_C_RUNS):
        stopped = interrupted_at_step_2(ringtune_command(
            "train", "--agents", f"{owner.url},{helper.url}", "--owner", owner.name,
            "--out", str(tmp_path / f"stopped-{attempt}"), *TRAIN[:2], "--steps", "100000", *TRAIN[4:]))
        assert stopped.returncode == 130, f"attempt {attempt}: {stopped.stderr}"
        assert "interrupted" in stopped.stderr and "Traceback" not in stopped.stderr
        for agent in (owner, helper):
            client = AgentClient(agent.url)
            client.pair(TOKEN, "after-ctrl-c")
            assert client.request(Status()).state == "free"
            client.close()
    again = run("train", "--agents", f"{owner.url},{helper.url}", "--owner", owner.name,
                "--out", str(tmp_path / "again"), *TRAIN)
    assert again.returncode == 0, again.stderr


def test_systemd_unit_runs_the_same_agent_command_and_reads_the_token_from_the_state_dir(tmp_path):
    import os
    import stat

    state = tmp_path / "state"
    result = run("agent", "--name", "pi-kitchen", "--token", TOKEN, "--interface", "eth0", "--state-dir", str(state),
                 "--print-systemd-unit")
    assert result.returncode == 0, result.stderr
    exec_line = next(line for line in result.stdout.splitlines() if line.startswith("ExecStart="))
    assert "agent --name pi-kitchen" in exec_line and "--interface eth0" in exec_line
    assert "--print-systemd-unit" not in exec_line and "WantedBy=multi-user.target" in result.stdout
    assert TOKEN not in result.stdout and "--token" not in exec_line and f"--state-dir {state}" in exec_line
    assert (state / "token").read_text().strip() == TOKEN
    assert stat.S_IMODE(os.stat(state / "token").st_mode) == 0o600
    again = run("agent", "--name", "pi-kitchen", "--token", "another-token-0123456789", "--state-dir", str(state),
                "--print-systemd-unit")
    assert again.returncode != 0 and "holds another token" in again.stderr
