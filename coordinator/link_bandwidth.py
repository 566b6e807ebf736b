"""Each agent's link bandwidth, measured before planning (a short timed transfer, like the block calibration).

The coordinator streams to every agent's probe sink (``edge_runtime.transport.link_probe``; the
agent's hello names its port) one agent at a time, so each transfer has the network to itself.
Where devices share a switch or an access point, a device's link to the coordinator is its link
to any ring neighbour; the planner prices a ring edge by the slower of its two ends.
"""
from __future__ import annotations

from urllib.parse import urlparse

import pynng

from coordinator.client import AgentUnreachable
from edge_runtime.transport.link_probe import measure_link

PROBE_SECONDS = 0.5
"""Per agent: long enough to outweigh a shaper's burst and TCP's slow start on a LAN."""


def probe_url(control_url: str, probe_port: int) -> str:
    """The agent's probe sink, at the host the coordinator reaches its control port on."""
    return f"tcp://{urlparse(control_url).hostname}:{probe_port}"


def agent_link_bytes_per_s(name: str, control_url: str, probe_port: int, seconds: float = PROBE_SECONDS) -> float:
    """Bytes/s from here to the agent; AgentUnreachable if its probe sink does not take the transfer."""
    url = probe_url(control_url, probe_port)
    try:
        return measure_link(url, seconds).bytes_per_s
    except pynng.NNGException as error:
        raise AgentUnreachable(f"agent {name}'s link probe at {url} failed: {error}") from None
