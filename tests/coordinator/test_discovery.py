"""Coordinator side of discovery: waiting by count or name, timeouts that name who is missing,
``ringtune devices``, and discovery across network namespaces (root)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import threading
import time
import uuid

import pytest

from coordinator.commands import devices
from coordinator.discovery import (AgentTable, AmbiguousAgent, DiscoveryTimeout, MdnsDiscovery,
                                   MemoryAdvertiser, MemoryDiscovery, MemoryRegistry)
from tests.discovery_helper import REPO, make_advert, start_advertiser, stop

LOOPBACK = ["127.0.0.1"]


def unique(label: str) -> str:
    # Other test runs may advertise on loopback at the same time: only look for our own names.
    return f"t{uuid.uuid4().hex[:8]}-{label}"


@pytest.fixture
def registry() -> MemoryRegistry:
    return MemoryRegistry()


def test_wait_for_names_returns_them_in_the_order_asked(registry: MemoryRegistry) -> None:
    a, b = make_advert("pi-a"), make_advert("pi-b")
    with MemoryAdvertiser(registry, a), MemoryAdvertiser(registry, b):
        assert MemoryDiscovery(registry).wait_for(["pi-b", "id-pi-a"], timeout=0) == [b, a]
        assert MemoryDiscovery(registry).wait_for("pi-a", timeout=0) == [a]


def test_wait_for_a_count_returns_every_agent_seen(registry: MemoryRegistry) -> None:
    adverts = [make_advert(f"pi-{c}") for c in "cab"]
    for advert in adverts:
        MemoryAdvertiser(registry, advert)
    assert [a.name for a in MemoryDiscovery(registry).wait_for(2, timeout=0)] == ["pi-a", "pi-b", "pi-c"]


def test_wait_for_wakes_up_when_an_agent_arrives(registry: MemoryRegistry) -> None:
    late = make_advert("pi-late")
    timer = threading.Timer(0.2, MemoryAdvertiser, (registry, late))
    timer.start()
    started = time.monotonic()
    try:
        assert MemoryDiscovery(registry).wait_for(["pi-late"], timeout=5) == [late]
    finally:
        timer.cancel()
    assert time.monotonic() - started < 2


def test_timeout_names_the_missing_agents(registry: MemoryRegistry) -> None:
    MemoryAdvertiser(registry, make_advert("pi-a"))
    with pytest.raises(DiscoveryTimeout) as caught:
        MemoryDiscovery(registry).wait_for(["pi-a", "pi-b", "pi-c"], timeout=0.1)
    assert caught.value.missing == ("pi-b", "pi-c")
    assert "pi-b, pi-c" in str(caught.value) and "found: pi-a" in str(caught.value)
    assert "--timeout" in str(caught.value)  # says what to do


def test_timeout_for_a_count_says_how_many_are_missing(registry: MemoryRegistry) -> None:
    MemoryAdvertiser(registry, make_advert("pi-a"))
    with pytest.raises(DiscoveryTimeout, match="found 1 of 3 free agents .* 2 missing") as caught:
        MemoryDiscovery(registry).wait_for(3, timeout=0.1)
    assert caught.value.missing_count == 2


def test_a_count_takes_only_agents_not_busy_with_a_run(registry: MemoryRegistry) -> None:
    MemoryAdvertiser(registry, make_advert("pi-a"))
    MemoryAdvertiser(registry, dataclasses.replace(make_advert("pi-b", port=7802), busy="0123456789abcdef"))
    assert [a.name for a in MemoryDiscovery(registry).wait_for(1, timeout=0)] == ["pi-a"]
    with pytest.raises(DiscoveryTimeout, match=r"found 1 of 2 free agents .*pi-b \(busy with another run\)"):
        MemoryDiscovery(registry).wait_for(2, timeout=0.1)
    assert len(MemoryDiscovery(registry).wait_for(2, timeout=0, lineage="0123456789abcdef")) == 2  # resuming it
    assert MemoryDiscovery(registry).wait_for(["pi-b"], timeout=0)[0].busy  # named: the run refuses it, saying why


def test_busy_survives_the_txt_record() -> None:
    advert = dataclasses.replace(make_advert("pi-a"), busy="0123456789abcdef")
    assert type(advert).from_txt(advert.to_txt()) == advert


def test_a_closed_advertiser_is_no_longer_seen(registry: MemoryRegistry) -> None:
    advert = make_advert("pi-a")
    MemoryAdvertiser(registry, advert).close()
    assert MemoryDiscovery(registry).snapshot(timeout=0) == []


def test_two_agents_with_one_name_are_ambiguous(registry: MemoryRegistry) -> None:
    MemoryAdvertiser(registry, make_advert("pi-a"))
    MemoryAdvertiser(registry, dataclasses.replace(make_advert("pi-a"), agent_id="other"))
    with pytest.raises(AmbiguousAgent, match="by id"):
        MemoryDiscovery(registry).wait_for(["pi-a"], timeout=0)
    assert len(MemoryDiscovery(registry).wait_for(["other"], timeout=0)) == 1


def test_one_agent_seen_under_two_keys_is_listed_once() -> None:
    table = AgentTable()
    old, new = make_advert("pi-a", port=7801), make_advert("pi-a", port=7802)
    table.put("pi-a (old)", old)
    table.put("pi-a (new)", new)
    assert table.seen()[1] == [new]
    table.remove("pi-a (new)")
    assert table.seen()[1] == [old]


def test_wait_for_refuses_nothing_to_wait_for(registry: MemoryRegistry) -> None:
    with pytest.raises(ValueError, match="at least one"):
        MemoryDiscovery(registry).wait_for([], timeout=0)


@pytest.mark.slow
def test_mdns_timeout_names_the_missing_agent() -> None:
    present, absent = unique("here"), unique("absent")
    advert = make_advert(present, port=7831)
    process = start_advertiser(present, "127.0.0.1", port=7831)
    try:
        with MdnsDiscovery(interfaces=LOOPBACK) as discovery:
            with pytest.raises(DiscoveryTimeout) as caught:
                discovery.wait_for([present, absent], timeout=3)
        assert caught.value.missing == (absent,)
        assert advert in caught.value.found
    finally:
        stop(process)


def devices_args(**overrides) -> argparse.Namespace:
    return argparse.Namespace(**{"timeout": 0.01, "interface": ["127.0.0.1"], "json": False, **overrides})


def test_devices_prints_a_plain_table_when_not_a_terminal(registry, monkeypatch, capsys) -> None:
    MemoryAdvertiser(registry, make_advert("pi-a", has_data=True))
    MemoryAdvertiser(registry, make_advert("pi-b", port=7802))
    monkeypatch.setattr(devices, "MdnsDiscovery", lambda interfaces: MemoryDiscovery(registry))
    assert devices.run(devices_args()) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == list(devices.COLUMNS)
    assert lines[1].split() == ["pi-a", "127.0.0.1:7800", "4", "8.0", "GiB", "12.5", "torch", "yes"]
    assert lines[2].split()[-1] == "-"


def test_devices_says_what_to_do_when_nothing_is_found(registry, monkeypatch, capsys) -> None:
    monkeypatch.setattr(devices, "MdnsDiscovery", lambda interfaces: MemoryDiscovery(registry))
    assert devices.run(devices_args()) == 0
    assert "start `ringtune agent`" in capsys.readouterr().err


def test_devices_refuses_an_unknown_interface() -> None:
    with pytest.raises(ValueError, match="choose one of"):
        devices.run(devices_args(interface=["203.0.113.99"]))


@pytest.mark.slow
def test_devices_json_lists_agents_advertised_by_other_processes() -> None:
    names = [unique("a"), unique("b")]
    processes = [start_advertiser(names[0], "127.0.0.1", port=7841, has_data=True)]
    try:
        processes.append(start_advertiser(names[1], "127.0.0.1", port=7842))
        started = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "ringtune.cli", "devices", "--interface", "127.0.0.1",
                                 "--timeout", "3", "--json"], cwd=REPO, capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0, result.stderr
        listed = {agent["name"]: agent for agent in json.loads(result.stdout)}
        assert time.monotonic() - started < 15  # 3 s of listening plus interpreter start-up
        for name, port, has_data in ((names[0], 7841, True), (names[1], 7842, False)):
            expected = devices.to_json(make_advert(name, port=port, has_data=has_data))
            assert listed[name] == expected
    finally:
        for process in processes:
            stop(process)


# --- across network namespaces (root) ----------------------------------------------------------

@pytest.mark.root
@pytest.mark.slow
def test_agents_in_two_namespaces_are_discovered_from_a_third(bridged_namespaces: dict[str, str]) -> None:
    (ns_a, ip_a), (ns_b, ip_b), (ns_c, ip_c) = bridged_namespaces.items()
    names = [unique("a"), unique("b")]
    processes = []
    try:
        processes.append(start_advertiser(names[0], ip_a, prefix=("ip", "netns", "exec", ns_a)))
        processes.append(start_advertiser(names[1], ip_b, prefix=("ip", "netns", "exec", ns_b)))
        result = subprocess.run(["ip", "netns", "exec", ns_c, sys.executable, "-m", "tests.discovery_helper",
                                 "discover", "--ip", ip_c, "--names", ",".join(names), "--timeout", "10"],
                                cwd=REPO, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        found = json.loads(result.stdout)
        assert found["agents"] == [{"name": names[0], "control_url": f"tcp://{ip_a}:7800"},
                                   {"name": names[1], "control_url": f"tcp://{ip_b}:7800"}]
        assert found["seconds"] < 5
    finally:
        for process in processes:
            stop(process)
