"""In-memory edges for fast tests: the same framing and checks, bytes handed over directly."""
from __future__ import annotations

from edge_runtime.transport.base import Edge, EdgeClosed, EdgeConfig


class InMemoryEdge(Edge):
    def __init__(self, config: EdgeConfig) -> None:
        super().__init__(config)
        self.peer: InMemoryEdge | None = None

    @staticmethod
    def pair(left: EdgeConfig, right: EdgeConfig) -> tuple["InMemoryEdge", "InMemoryEdge"]:
        a, b = InMemoryEdge(left), InMemoryEdge(right)
        a.peer, b.peer = b, a
        return a, b

    def _transmit(self, data: bytes) -> None:
        if self.peer is None or self.peer._closed:
            raise EdgeClosed(f"{self.config.peer} is closed")
        self.peer._accept(data)
