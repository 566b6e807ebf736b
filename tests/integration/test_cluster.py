"""An emulated cluster (namespaces, tc, cgroups) trained through by discovery, and torn down (root)."""
import json
import os
import re
import subprocess
import uuid

import pytest
from safetensors.torch import load_file

import cluster
from cluster import cgroups, netns
from device_profiles import DeviceProfile
from edge_runtime.data.dataset import OwnerData, read_records
from edge_runtime.models.lora import LoraSpec
from edge_runtime.models.registry import load_tokenizer
from helpers import ringtune_command, write_text_data
from reference import max_difference, reference_adapter
from ringtune.optimizer_spec import OptimizerSpec

pytestmark = pytest.mark.slow
TRAIN = ["--model", "tiny-llama", "--steps", "2", "--micro-batches", "2", "--seq-len", "16", "--split", "even",
         "--seed", "5"]
# Fixed, so the quotas do not depend on how busy the machine is: 3 x 30 / 45 = 2 cores in all.
CORE_GFLOPS = 45.0


@pytest.fixture
def any_prefix(tmp_path, monkeypatch):
    """A fresh prefix; afterwards (pass or fail) no namespace, cgroup or agent of it may be left."""
    monkeypatch.setenv("RINGTUNE_CACHE", str(tmp_path / "cache"))
    name = f"rtc{uuid.uuid4().hex[:6]}"
    yield name
    cluster.down(prefix=name)
    assert not netns.namespaces(name) and not cgroups.groups(name)
    agents = subprocess.run(["pgrep", "-f", f"cluster/{name}/"], capture_output=True, text=True).stdout
    assert not agents, f"agents left running: {agents}"


@pytest.fixture
def prefix(any_prefix):
    if os.geteuid() != 0:
        pytest.skip("needs root for namespaces and cgroups (run the tests as root, e.g. in CI)")
    return any_prefix


def run_as_coordinator(state, *args):
    return subprocess.run(state.coordinator_command(ringtune_command(*args)), capture_output=True, text=True,
                          timeout=240, env={**os.environ, "RINGTUNE_TOKEN": state.token,
                                            "RINGTUNE_CLUSTER_STATE": state.path})


@pytest.mark.root
def test_training_through_discovery_on_an_emulated_cluster_equals_single_process_training(prefix, tmp_path):
    data = write_text_data(tmp_path / "data.jsonl")
    state = cluster.up(["rpi5-8gb:own", "rpi5-8gb:mid", "rpi5-8gb:end"], data, prefix=prefix,
                       core_gflops=CORE_GFLOPS, say=lambda _: None)
    assert state.mode == "netns" and [d.owner for d in state.devices] == [True, False, False]
    for device in state.devices:  # each link, CPU and RAM capped as its profile says
        assert "rate 940Mbit" in netns.link_qdisc(device.namespace)
        assert "rate 940Mbit" in netns.link_qdisc(state.bridge_namespace, f"p{state.devices.index(device) + 1}")
        group = cgroups.Cgroup(device.cgroup)
        assert (group.path("cpu") / "cpu.cfs_quota_us").read_text().strip() == str(cgroups.quota_us(30 / CORE_GFLOPS))
        assert group.memory_limit() == pytest.approx(7e9, abs=4096) and device.pid in group.pids()  # whole pages

    listed = run_as_coordinator(state, "devices", "--interface", state.coordinator_ip, "--json", "--timeout", "3")
    assert listed.returncode == 0, listed.stderr
    found = {d["name"]: d for d in json.loads(listed.stdout)}
    assert sorted(found) == ["end", "mid", "own"] and found["own"]["has_data"]
    assert found["mid"]["ram_bytes"] == pytest.approx(7e9, abs=4096)  # the agent sees its device's RAM, not this machine's

    trained = run_as_coordinator(state, "train", "--discover", "3", "--interface", state.coordinator_ip,
                                 "--out", str(tmp_path / "cluster"), *TRAIN)
    assert trained.returncode == 0, trained.stderr
    for item in cluster.status(state):  # peak memory of every agent within its device's RAM
        assert item.state == "running" and item.oom_kills == 0
        assert 0 < item.peak_rss_bytes < 7e9 and 0 < item.peak_bytes < 7e9
    owner_data = OwnerData(read_records(data), load_tokenizer("tiny-llama"), 2, 16, 2, seed=5)
    expected = reference_adapter("tiny-llama", LoraSpec(seed=5), OptimizerSpec(), owner_data, 2)  # TRAIN in one process
    assert max_difference(load_file(tmp_path / "cluster" / "adapter_model.safetensors"), expected) < 1e-5

    removed = cluster.down(state)
    assert f"namespace {prefix}-coord" in removed and f"cgroup ringtune-{prefix}-own" in removed
    assert not os.path.exists(state.path)


@pytest.mark.root
def test_an_agent_over_its_devices_memory_is_reported_killed_out_of_memory(prefix):
    tiny = DeviceProfile("crumb", ram_bytes=150_000_000, cores=1, gflops=30.0, link_bytes_per_s=1e6)
    with pytest.raises(cluster.ClusterError, match=r"agent crumb was killed: out of memory \(limit 0.1 GB"):
        cluster.up([tiny], prefix=prefix, core_gflops=CORE_GFLOPS, say=lambda _: None)
    assert not netns.namespaces(prefix) and not cgroups.groups(prefix)  # a failed up removes what it made


def test_without_root_the_agents_run_on_loopback_and_say_nothing_is_emulated(any_prefix, tmp_path):
    said = []
    # Other runs may advertise on loopback too: the names carry the prefix.
    state = cluster.up([f"rpi4-4gb:{any_prefix}-own", f"rpi4-4gb:{any_prefix}-pi"], write_text_data(tmp_path / "data.jsonl"),
                       prefix=any_prefix, loopback=True, say=said.append)
    assert state.mode == "loopback" and "NOT emulated" in said[0]
    assert all(d.namespace is None and d.cpu_cores is None and d.control_url.startswith("tcp://127.0.0.1:")
               for d in state.devices)
    listed = subprocess.run(ringtune_command("devices", "--interface", "127.0.0.1", "--json", "--timeout", "3"),
                            capture_output=True, text=True, timeout=60)
    found = {d["name"]: d["control_url"] for d in json.loads(listed.stdout)}
    assert all(found.get(d.name) == d.control_url for d in state.devices)
    assert [s.state for s in cluster.status(state)] == ["running", "running"]
    cluster.down(state)
    assert not any(device.running() for device in state.devices)


@pytest.mark.root
def test_doctor_inside_an_emulated_device_sees_its_caps(prefix, tmp_path):
    state = cluster.up(["rpi5-8gb:doc"], prefix=prefix, core_gflops=CORE_GFLOPS, start_agents=False,
                       say=lambda _: None)
    device = state.device("doc")
    clock_url = f"tcp://{state.coordinator_ip}:7731"
    server = subprocess.Popen(state.coordinator_command(ringtune_command("doctor", "--serve-clock", clock_url)),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert "serving the time" in server.stdout.readline()
        doctor = device.spawn(ringtune_command("doctor", "--json", "--interface", device.ip, "--profile", "rpi5-8gb",
                                               "--threads", "1", "--seconds", "0.5", "--state-dir",
                                               str(tmp_path / "state"), "--coordinator", clock_url),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = doctor.communicate(timeout=300)
    finally:
        server.terminate()
        server.wait(10)
    found = {f["check"]: f for f in json.loads(out)}
    assert "7.00 GB (cgroup limit" in found["cgroup limit"]["detail"], err  # the device's RAM, not this machine's
    interface = next(check for check in found if check.startswith("mDNS "))
    assert found[interface]["status"] == "ok" and device.ip in found[interface]["detail"]
    assert "of the rpi5-8gb profile's 30" in found["matmul speed"]["detail"]
    assert found["clock"]["status"] == "ok" and clock_url in found["clock"]["detail"]
    assert found[f"port 7720"]["status"] == "ok" and device.ip in found["port 7720"]["detail"]


@pytest.mark.root
def test_link_bandwidth_is_measured_within_a_fifth_of_the_tbf_cap(prefix):
    caps = {"slow": 40e6 / 8, "wifi": 100e6 / 8}  # bytes/s, as tc tbf shapes each device's link both ways
    devices = [DeviceProfile(name, ram_bytes=2_000_000_000, cores=1, gflops=30.0, link_bytes_per_s=cap)
               for name, cap in caps.items()]
    state = cluster.up(devices, prefix=prefix, core_gflops=CORE_GFLOPS, start_agents=False, say=lambda _: None)
    for name, cap in caps.items():
        device = state.device(name)
        url = f"tcp://{device.ip}:7740"
        sink = device.spawn(ringtune_module("edge_runtime.transport.link_probe", "serve", url),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert "link probe sink" in sink.stdout.readline()
            measured = subprocess.run(state.coordinator_command(ringtune_module(
                "edge_runtime.transport.link_probe", "measure", url, "--seconds", "1.5")),
                capture_output=True, text=True, timeout=120)
        finally:
            sink.stdin.close()
            sink.wait(10)
        assert measured.returncode == 0, measured.stderr
        mbit = float(measured.stdout.split()[0])
        assert mbit == pytest.approx(cap * 8 / 1e6, rel=0.2), measured.stdout


def ringtune_module(module: str, *args: str) -> list[str]:
    import sys
    return [sys.executable, "-m", module, *args]


@pytest.mark.root
def test_train_measures_each_agents_link_and_plans_with_it(prefix, tmp_path):
    caps = {"own": 100e6 / 8, "slow": 40e6 / 8}
    devices = [DeviceProfile(name, ram_bytes=2_000_000_000, cores=1, gflops=30.0, link_bytes_per_s=cap)
               for name, cap in caps.items()]
    state = cluster.up(devices, write_text_data(tmp_path / "data.jsonl"), prefix=prefix, core_gflops=CORE_GFLOPS,
                       say=lambda _: None)
    trained = run_as_coordinator(state, "train", "--discover", "2", "--interface", state.coordinator_ip,
                                 "--out", str(tmp_path / "run"), "--model", "tiny-llama", "--steps", "1",
                                 "--micro-batches", "2", "--seq-len", "16", "--seed", "5")
    assert trained.returncode == 0, trained.stderr
    [line] = [line for line in trained.stdout.splitlines() if "link bandwidth:" in line]
    measured = dict(re.findall(r"(\w+) (\d+) Mbit/s", line))
    assert {name: float(mbit) for name, mbit in measured.items()} == {
        name: pytest.approx(cap * 8 / 1e6, rel=0.2) for name, cap in caps.items()}, line
