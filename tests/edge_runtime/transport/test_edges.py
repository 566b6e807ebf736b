import threading
import time

import pytest
import torch

from edge_runtime.transport.base import EdgeConfig, EdgeTimeout
from edge_runtime.transport.frames import FrameHeader, pack_frame
from edge_runtime.transport.memory import InMemoryEdge
from edge_runtime.transport.pynng_edge import PynngEdge
from ringtune.security import FrameAuthenticator, link_key, new_key
from ringtune.wire import WireSpec

SHAPE = (2, 3, 4)


KEY = new_key()


def config(me, peer, timeout=5.0, run="run1", key=KEY):
    return EdgeConfig.for_link(run, key, me, peer, SHAPE, timeout)


def memory_pair(timeout=5.0):
    return InMemoryEdge.pair(config(0, 1, timeout), config(1, 0, timeout))


def pynng_pair(timeout=5.0):
    listener = PynngEdge(config(1, 0, timeout), listen="tcp://127.0.0.1:0")
    dialer = PynngEdge(config(0, 1, timeout), dial=listener.url)
    return dialer, listener


@pytest.fixture(params=["memory", "pynng"])
def pair(request):
    left, right = (memory_pair if request.param == "memory" else pynng_pair)()
    yield left, right
    left.close()
    right.close()


def test_frames_arrive_both_ways_out_of_order(pair):
    left, right = pair
    a, b, g = torch.randn(SHAPE), torch.randn(SHAPE), torch.randn(SHAPE)
    left.send("activation", 0, 0, a)
    left.send("activation", 0, 1, b)
    right.send("gradient", 0, 1, g)
    assert torch.equal(right.recv("activation", 0, 1), b)
    assert torch.equal(right.recv("activation", 0, 0), a)
    assert torch.equal(left.recv("gradient", 0, 1), g)


def wait_for(predicate, seconds=5.0):
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert predicate()


def test_replayed_and_stale_frames_are_refused(pair):
    left, right = pair
    tensor = torch.randn(SHAPE)
    left.send("activation", 3, 0, tensor)
    right.recv("activation", 3, 0)
    left.send("activation", 3, 0, tensor)  # the same frame again
    right.begin_step(4)
    left.send("activation", 3, 1, tensor)  # a straggler from an old step
    wait_for(lambda: right.refused["replay"] == 2)


def test_a_captured_frame_sent_again_is_refused_as_a_replay():
    left, right = memory_pair(timeout=0.2)
    captured = []
    original = left._transmit
    left._transmit = lambda data: (captured.append(data), original(data))
    left.send("activation", 0, 0, torch.randn(SHAPE))
    right.recv("activation", 0, 0)
    right._accept(captured[0])
    assert right.refused["replay"] == 1


def sealed(kind="activation", step=0, run="run1", shape=SHAPE, key=KEY, dtype="float32", codec="fp32"):
    """A frame as stage 0 would send it to stage 1 (with the given key)."""
    sealer = FrameAuthenticator(link_key(key, "stage 0", "stage 1"))
    header = FrameHeader(run, step, 0, kind, dtype, shape, codec)
    return sealer.seal(*pack_frame(header, torch.zeros(shape)))


def flipped_last_byte(frame: bytes) -> bytes:
    """The frame with its last byte changed (overwriting it with a fixed byte left it intact when the seal's
    random last byte already was that byte: 1 run in 256)."""
    return frame[:-1] + bytes([frame[-1] ^ 0x01])


@pytest.mark.parametrize("frame, reason", [
    (lambda: sealed(run="other"), "unexpected"),
    (lambda: sealed(shape=(1, 3, 4)), "unexpected"),
    (lambda: sealed(codec="int8"), "unexpected"),  # a codec the run did not choose
    (lambda: sealed(key=new_key()), "authentication"),
    (lambda: flipped_last_byte(sealed()), "authentication"),
    (lambda: b"\0" * (memory_pair()[1].config.max_frame_bytes + 1), "oversized"),
])
def test_bad_frames_are_refused_counted_and_never_stored(frame, reason):
    _, right = memory_pair(timeout=0.2)
    right._accept(frame())
    assert right.refused == {reason: 1}
    with pytest.raises(EdgeTimeout):
        right.recv("activation", 0, 0)


def test_malformed_header_with_a_valid_seal_is_refused():
    _, right = memory_pair()
    sealer = FrameAuthenticator(link_key(KEY, "stage 0", "stage 1"))
    right._accept(sealer.seal(b"\x93garbage", b""))
    assert right.refused == {"malformed": 1}


def test_receive_times_out_naming_the_peer():
    left, right = pynng_pair(timeout=0.3)
    with pytest.raises(EdgeTimeout, match="no activation for step 0 micro-batch 0 from stage 0 within"):
        right.recv("activation", 0, 0)
    left.close()
    right.close()


def test_send_to_nobody_times_out_naming_the_url():
    edge = PynngEdge(config(1, 2, timeout=0.3), dial="tcp://127.0.0.1:9")
    with pytest.raises(EdgeTimeout, match="could not send to stage 2 at tcp://127.0.0.1:9"):
        edge.send("activation", 0, 0, torch.zeros(SHAPE))
    edge.close()


def test_oversized_message_never_reaches_the_store():
    import pynng
    right = PynngEdge(config(1, 0), listen="tcp://127.0.0.1:0")
    with pynng.Pair0(dial=right.url, send_timeout=2000) as raw:
        raw.send(b"\1" * (right.config.max_frame_bytes + 1))  # refused and counted by ringtune
        wait_for(lambda: sum(right.refused.values()) == 1)
        raw.send(b"\0" * (4 * right.config.max_frame_bytes))  # dropped by nng's own size limit
    assert not right._frames
    right.close()


def test_abort_wakes_a_waiting_receiver():
    left, right = memory_pair(timeout=30)
    errors = []
    waiter = threading.Thread(target=lambda: errors.append(pytest.raises(Exception, right.recv, "activation", 0, 0)))
    waiter.start()
    time.sleep(0.1)
    right.abort()
    waiter.join(timeout=5)
    assert not waiter.is_alive()
    assert "run stopped" in str(errors[0].value)


def test_compressed_edges_send_the_codecs_bytes():
    shape = (4, 64, 576)
    sent = {}
    for wire in (WireSpec(), WireSpec("int8", "bf16")):
        left, right = InMemoryEdge.pair(*(EdgeConfig.for_link("run1", KEY, me, peer, shape, 5.0, wire=wire)
                                          for me, peer in ((0, 1), (1, 0))))
        hidden, grad = torch.randn(shape), torch.randn(shape)
        left.send("activation", 0, 0, hidden)
        right.send("gradient", 0, 0, grad)
        assert torch.allclose(right.recv("activation", 0, 0), hidden, atol=0.02 * float(hidden.abs().max()))
        assert torch.allclose(left.recv("gradient", 0, 0), grad, rtol=2 ** -8)
        sent[wire.activation] = (left.bytes_sent, right.bytes_sent)
    assert sent["int8"][0] / sent["fp32"][0] < 0.27 and sent["int8"][1] / sent["fp32"][1] < 0.51
