"""Agent side of discovery: the advert's TXT encoding, interface choice, and real mDNS on loopback."""
from __future__ import annotations

import time
import uuid

import pytest

from coordinator.discovery.mdns import MdnsDiscovery
from edge_runtime.discovery import AdvertError, Advertiser, AgentAdvert, InterfaceError, parse_interfaces
from tests.discovery_helper import make_advert

LOOPBACK = ["127.0.0.1"]  # never multicast on the machine's real network


def unique(label: str) -> str:
    # Other test runs may advertise on loopback at the same time: only look for our own names.
    return f"t{uuid.uuid4().hex[:8]}-{label}"


def test_txt_round_trip_keeps_every_field() -> None:
    advert = make_advert("pi-a", has_data=True)
    raw = {k.encode(): v.encode() for k, v in advert.to_txt().items()}  # as zeroconf hands it over
    assert AgentAdvert.from_txt(raw) == advert
    assert AgentAdvert.from_txt(advert.to_txt()) == advert


@pytest.mark.parametrize("change, message", [
    ({"txtvers": "2"}, "TXT version"),
    ({"cores": "many"}, "malformed"),
    ({"rt": "tensorflow"}, "runtime"),
    ({"ctl": "pi-a"}, "tcp://HOST:PORT"),
    ({"cores": "0"}, "impossible"),
])
def test_malformed_txt_is_refused_with_reason(change: dict[str, str], message: str) -> None:
    txt = {**make_advert("pi-a").to_txt(), **change}
    with pytest.raises(AdvertError, match=message):
        AgentAdvert.from_txt(txt)


def test_missing_txt_key_is_named() -> None:
    txt = make_advert("pi-a").to_txt()
    del txt["gflops"]
    with pytest.raises(AdvertError, match="gflops"):
        AgentAdvert.from_txt(txt)


def test_oversized_txt_item_is_refused() -> None:
    with pytest.raises(AdvertError, match="over 255 bytes"):
        make_advert("x" * 300).to_txt()


def test_wildcard_host_is_replaced_by_a_reachable_one() -> None:
    advert = make_advert("pi-a", ip="0.0.0.0", port=7811)
    assert advert.has_wildcard_host
    assert advert.with_host("10.0.0.5").control_url == "tcp://10.0.0.5:7811"
    assert not make_advert("pi-b").has_wildcard_host


def test_interfaces_accept_addresses_and_names_and_refuse_others() -> None:
    assert parse_interfaces(["127.0.0.1"]) == LOOPBACK
    assert parse_interfaces(["lo"]) == LOOPBACK
    assert parse_interfaces(None) == "all"
    with pytest.raises(InterfaceError, match="choose one of"):
        parse_interfaces(["203.0.113.99"])


def wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


@pytest.mark.slow
def test_two_advertisers_are_browsed_with_profiles_then_a_closed_one_leaves() -> None:
    adverts = [make_advert(unique("a"), port=7821, has_data=True), make_advert(unique("b"), port=7822)]
    first = Advertiser(adverts[0], interfaces=LOOPBACK)
    try:
        with Advertiser(adverts[1], interfaces=LOOPBACK), MdnsDiscovery(interfaces=LOOPBACK) as discovery:
            started = time.monotonic()
            found = discovery.wait_for([a.name for a in adverts], timeout=5)
            assert time.monotonic() - started < 5
            assert found == adverts  # every profile field made it through TXT
            first.close()
            gone = wait_until(lambda: adverts[0] not in discovery.table.seen()[1], timeout=5)
            assert gone, "a closed advertiser says goodbye, so it should leave the table at once"
            assert adverts[1] in discovery.table.seen()[1]
    finally:
        first.close()
