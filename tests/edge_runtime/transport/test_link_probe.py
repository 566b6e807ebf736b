"""The link probe on loopback: a timed transfer the sink measures (capped links: test_cluster.py)."""
from __future__ import annotations

import pytest

from edge_runtime.transport.link_probe import ProbeSink, measure_link


def test_a_transfer_is_measured_by_the_sink_and_it_serves_again():
    with ProbeSink("tcp://127.0.0.1:0") as sink:
        first = measure_link(sink.url, seconds=0.2, chunk_bytes=16 * 1024)
        second = measure_link(sink.url, seconds=0.1, chunk_bytes=16 * 1024)
    for result in (first, second):
        assert result.bytes > 0 and result.bytes % (16 * 1024) == 0
        assert result.bytes_per_s > 1e6  # loopback moves far more than a megabyte a second
    assert first.seconds >= 0.2


def test_chunks_are_bounded():
    with pytest.raises(ValueError, match="chunk_bytes"):
        measure_link("tcp://127.0.0.1:9", chunk_bytes=2 * 1024 * 1024)
