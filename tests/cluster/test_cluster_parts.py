"""The pure parts of the emulated cluster: CPU quotas, tc parameters, device records, the state file."""
import stat

import pytest

from cluster import cgroups, netns
from cluster.emulate import check_prefix, device_records
from cluster.state import ClusterState, DeviceRecord, load_state
from device_profiles import BUILTIN_PROFILES
from device_profiles.live import cgroup_memory


def test_cpu_quotas_follow_device_speed_and_shrink_together_to_fit():
    fits = cgroups.cpu_quotas([10.0, 30.0], core_gflops=50.0, cores=2)
    assert fits.quotas == pytest.approx((0.2, 0.6)) and fits.scale == 1.0
    shrunk = cgroups.cpu_quotas([200.0, 100.0], core_gflops=50.0, cores=2)
    assert shrunk.scale == pytest.approx(2 / 6)
    assert shrunk.quotas == pytest.approx((4 / 3, 2 / 3)) and sum(shrunk.quotas) == pytest.approx(2.0)
    assert cgroups.cpu_quotas([0.001], core_gflops=50.0, cores=2).quotas[0] * cgroups.CFS_PERIOD_US >= cgroups.MIN_QUOTA_US
    with pytest.raises(ValueError, match="per-core"):
        cgroups.cpu_quotas([10.0], core_gflops=0.0, cores=2)


def test_quota_and_threads_of_a_share():
    assert cgroups.quota_us(0.25) == cgroups.CFS_PERIOD_US // 4
    assert [cgroups.threads_for(c) for c in (0.1, 1.0, 1.3)] == [1, 1, 2]


@pytest.mark.parametrize("mbit", [100, 940])
def test_tbf_caps_at_the_profile_rate_with_a_burst_the_timer_can_sustain(mbit):
    args = netns.tbf_args(mbit * 1e6 / 8)
    assert args[:3] == ["tbf", "rate", f"{mbit * 1_000_000}bit"]
    burst = int(args[args.index("burst") + 1])
    assert burst >= mbit * 1e6 / 8 / 1000 * 10 and burst >= 64 * 1024  # 10 ms of traffic: any HZ, GSO
    assert args[args.index("latency") + 1] == "50ms"
    with pytest.raises(ValueError, match="positive"):
        netns.tbf_args(0)


def test_device_records_name_devices_and_make_the_first_the_owner():
    records, scale = device_records(["rpi4-4gb", "rpi5-8gb:kitchen", "rpi4-4gb"], 50.0, 2, owner=True)
    assert [r.name for r in records] == ["rpi4-4gb-1", "kitchen", "rpi4-4gb-3"]
    assert [r.owner for r in records] == [True, False, False] and scale == 1.0
    assert records[1].profile == "rpi5-8gb" and records[1].cpu_cores == pytest.approx(0.6)
    assert records[0].memory_bytes == BUILTIN_PROFILES["rpi4-4gb"].ram_bytes
    assert records[0].link_bytes_per_s == BUILTIN_PROFILES["rpi4-4gb"].link_bytes_per_s
    uncapped, scale = device_records(["rpi4-4gb", "rpi5-8gb"], None, 2, owner=False)
    assert [r.cpu_cores for r in uncapped] == [None, None] and scale == 1.0 and not uncapped[0].owner
    with pytest.raises(ValueError, match="unique"):
        device_records(["rpi4-4gb:a", "rpi5-8gb:a"], 50.0, 2, owner=False)
    with pytest.raises(ValueError, match="not usable"):
        device_records(["rpi4-4gb:a/b"], 50.0, 2, owner=False)
    with pytest.raises(ValueError, match="unknown device profile"):
        device_records(["rpi9"], 50.0, 2, owner=False)


@pytest.mark.parametrize("prefix", ["", "rtc-x", "RTC", "a" * 13, "1rt"])
def test_prefixes_that_could_match_another_clusters_names_are_refused(prefix):
    with pytest.raises(ValueError, match="prefix"):
        check_prefix(prefix)


def test_state_file_round_trip_is_private_and_versioned(tmp_path):
    device = DeviceRecord(name="pi-a", profile="rpi4-4gb", ip="10.77.0.11", namespace="rtc-d0",
                          cgroup="ringtune-rtc-pi-a", link_bytes_per_s=117.5e6, cpu_cores=0.2, memory_bytes=3_000_000_000,
                          owner=True, control_url="tcp://10.77.0.11:7720", pid=123, log="/x/pi-a.log")
    state = ClusterState(prefix="rtc", mode="netns", token="t" * 32, coordinator_ip="10.77.0.1",
                         coordinator_namespace="rtc-coord", bridge_namespace="rtc-br", core_gflops=50.0,
                         cpu_scale=0.5, devices=(device,))
    saved = state.save(tmp_path / "rtc.json")
    assert load_state(tmp_path / "rtc.json") == saved == state
    assert stat.S_IMODE((tmp_path / "rtc.json").stat().st_mode) == 0o600  # it holds the token
    assert saved.device("pi-a").cgroup_paths == ("/sys/fs/cgroup/cpu/ringtune-rtc-pi-a",
                                                 "/sys/fs/cgroup/memory/ringtune-rtc-pi-a")
    assert saved.coordinator_command(["ringtune", "devices"]) == [
        "nsenter", "--net=/var/run/netns/rtc-coord", "--", "ringtune", "devices"]
    with pytest.raises(ValueError, match="no device 'pi-z'"):
        saved.device("pi-z")
    (tmp_path / "old.json").write_text('{"version": 0, "devices": []}')
    with pytest.raises(ValueError, match="another ringtune version"):
        load_state(tmp_path / "old.json")
    with pytest.raises(ValueError, match="cluster up"):
        load_state(tmp_path / "missing.json")


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_an_agent_sees_itscgroup_memory_limit(tmp_path, version):
    group = tmp_path / "memory" / "g" if version == "v1" else tmp_path / "g"
    group.mkdir(parents=True)
    names = ("memory.limit_in_bytes", "memory.usage_in_bytes") if version == "v1" else ("memory.max", "memory.current")
    (group / names[0]).write_text("3000000000\n")
    (group / names[1]).write_text("1000\n")
    proc = tmp_path / "cgroup"
    proc.write_text("4:memory:/g\n1:cpu:/\n" if version == "v1" else "0::/g\n")
    assert cgroup_memory(proc, tmp_path) == (3_000_000_000, 1000)
    (group / names[0]).write_text("max\n")
    assert version == "v1" or cgroup_memory(proc, tmp_path) is None
