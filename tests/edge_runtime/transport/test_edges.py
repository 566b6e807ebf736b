import threading
import time

import pytest
import torch

from edge_runtime.transport.base import EdgeConfig, EdgeTimeout
from edge_runtime.transport.frames import FrameHeader, encode_frame
from edge_runtime.transport.memory import InMemoryEdge
from edge_runtime.transport.pynng_edge import PynngEdge

SHAPE = (2, 3, 4)


def config(peer="peer", timeout=5.0, run="run1", key=b"k" * 32):
    return EdgeConfig(run=run, key=key, shape=SHAPE, timeout=timeout, peer=peer)


def memory_pair(timeout=5.0):
    return InMemoryEdge.pair(config("right", timeout), config("left", timeout))


def pynng_pair(timeout=5.0):
    listener = PynngEdge(config("left", timeout), listen="tcp://127.0.0.1:0")
    dialer = PynngEdge(config("right", timeout), dial=listener.url)
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
    wait_for(lambda: right.refused["replayed frame"] == 2)


@pytest.mark.parametrize("wrong", [dict(run="other"), dict(shape=(1, 3, 4)), dict(key=b"x" * 32)])
def test_wrong_run_shape_or_key_is_refused_and_counted(wrong):
    left, right = memory_pair(timeout=0.2)
    key = wrong.pop("key", b"k" * 32)
    fields = dict(run="run1", step=0, microbatch=0, kind="activation", dtype="float32", shape=SHAPE)
    fields.update(wrong)
    tensor = torch.zeros(fields["shape"])
    right._accept(encode_frame(FrameHeader(**fields), tensor, key))
    assert sum(right.refused.values()) == 1
    with pytest.raises(EdgeTimeout):  # the refused frame was never stored
        right.recv("activation", 0, 0)


def test_receive_times_out_naming_the_peer():
    left, right = pynng_pair(timeout=0.3)
    with pytest.raises(EdgeTimeout, match="no activation for step 0 micro-batch 0 from left within"):
        right.recv("activation", 0, 0)
    left.close()
    right.close()


def test_send_to_nobody_times_out_naming_the_url():
    edge = PynngEdge(config("stage 2", timeout=0.3), dial="tcp://127.0.0.1:9")
    with pytest.raises(EdgeTimeout, match="could not send to stage 2 at tcp://127.0.0.1:9"):
        edge.send("activation", 0, 0, torch.zeros(SHAPE))
    edge.close()


def test_oversized_message_never_reaches_the_store():
    import pynng
    right = PynngEdge(config("left"), listen="tcp://127.0.0.1:0")
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
