"""A real agent process under attack: wrong tokens, unpaired and replayed commands, bad frames, fuzz."""
import random
import secrets
import time

import msgpack
import psutil
import pynng
import pytest
import torch

from helpers import TOKEN, AgentProcess
from coordinator.client import AgentClient, PairingFailed
from coordinator.slices import cut_model
from edge_runtime.models.lora import LoraSpec
from edge_runtime.transport.frames import FrameHeader, pack_frame
from ringtune import control
from ringtune.plan import even_plan
from ringtune.security import FrameAuthenticator, link_key, new_key, wrap_key

pytestmark = pytest.mark.slow


@pytest.fixture
def agent(tmp_path):
    process = AgentProcess("guarded", tmp_path / "agent")
    yield process
    process.stop()


def paired(url, run="run-1", token=TOKEN):
    client = AgentClient(url, timeout=10)
    client.pair(token, run)
    return client


def test_wrong_token_is_refused_on_both_sides_and_the_agent_keeps_serving(agent):
    intruder = AgentClient(agent.url, timeout=10)
    with pytest.raises(PairingFailed, match="wrong token"):
        intruder.pair("not-the-token-at-all-0000", "run-x")
    with pytest.raises(control.ControlError, match="needs a paired session"):
        intruder.call("status")
    client = paired(agent.url)
    assert client.call("status")["refused_control"] == 2
    assert "refused a coordinator that does not know the pairing token" in agent.log.read_text()
    assert agent.alive()


def test_a_replayed_sealed_command_is_refused(agent):
    client = paired(agent.url)
    sealed = control.pack({"session": client._session, "sealed": client._channel.seal({"cmd": "status"})})
    with pynng.Req0(dial=agent.url, recv_timeout=5000, send_timeout=5000) as raw:
        raw.send(sealed)
        first = msgpack.unpackb(raw.recv())
        raw.send(sealed)
        second = msgpack.unpackb(raw.recv())
    assert "sealed" in first
    assert second["ok"] is False and "replay" in second["error"]


def test_fuzzed_control_messages_never_crash_or_hang_the_agent(agent):
    rss_before = psutil.Process(agent.process.pid).memory_info().rss
    rng = random.Random(0)
    valid = control.pack({"cmd": "hello"})
    with pynng.Req0(dial=agent.url, recv_timeout=5000, send_timeout=5000) as raw:
        for i in range(2000):
            if i % 3 == 0:
                data = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64)))
            elif i % 3 == 1:
                data = bytearray(valid)
                data[rng.randrange(len(data))] = rng.getrandbits(8)
                data = bytes(data)
            else:
                data = control.pack({"session": "x", "sealed": secrets.token_bytes(rng.randint(0, 80)),
                                     "cmd": rng.choice(["step", "assign", "upload", "status"])})
            raw.send(data)
            assert isinstance(msgpack.unpackb(raw.recv()), dict)
    with pynng.Req0(dial=agent.url, send_timeout=5000) as raw:  # dropped by the size limit: no reply
        raw.send(control.pack({"cmd": "x" * (control.MAX_REQUEST_BYTES + 1)}))
    assert agent.alive()
    assert paired(agent.url).call("hello")["name"] == "guarded"
    assert psutil.Process(agent.process.pid).memory_info().rss - rss_before < 100e6


def test_bad_and_fuzzed_data_plane_frames_are_dropped_and_counted(agent):
    """The test plays the coordinator and the agent's ring neighbour, so it knows the run key."""
    run, run_key = "run-frames", new_key()
    client = paired(agent.url, run=run)
    plan = even_plan("tiny-llama", 4, ["owner", "guarded"], "owner")  # guarded runs stage 1
    lora = LoraSpec(r=2, alpha=4)
    shipment = cut_model("tiny-llama", lora, plan)
    client.upload(shipment.slices["guarded"].sha256, shipment.slices["guarded"].path)
    shape = (1, 8, 64)
    reply = client.call("assign", run=run, plan=plan.to_dict(), config=shipment.config, hidden_size=shipment.hidden_size,
                        slice=shipment.slices["guarded"].sha256, tokenizer=None, lora=lora.to_dict(),
                        optimizer={"lr": 1e-3}, micro_batch_size=1, seq_len=8, seed=0,
                        run_key=wrap_key(client.session_key, run_key), timeout=30)
    listen = reply["listen"][1]
    sealer = FrameAuthenticator(link_key(run_key, "stage 0", "stage 1"))

    def frame(**fields):
        header = FrameHeader(**{**dict(run=run, step=0, microbatch=0, kind="activation", dtype="float32",
                                       shape=shape), **fields})
        return sealer.seal(*pack_frame(header, torch.zeros(header.shape)))

    good = frame()
    with pynng.Pair0(dial=listen, send_timeout=5000) as neighbour:
        neighbour.send(good[:-1] + bytes([good[-1] ^ 1]))  # bad MAC
        neighbour.send(FrameAuthenticator(link_key(new_key(), "stage 0", "stage 1")).seal(b"h", b""))  # wrong key
        neighbour.send(good)
        neighbour.send(good)  # replay
        neighbour.send(sealer.seal(b"\x93junk", b""))  # malformed header, valid seal
        neighbour.send(frame(shape=(1, 9, 64)))  # wrong shape
        neighbour.send(frame(run="other-run"))  # wrong run
        neighbour.send(b"\0" * (1 * 8 * 64 * 4 + 5000))  # oversized for this edge
        rng = random.Random(1)
        for i in range(2000):  # fuzz: random bytes, and good frames with bytes flipped
            if i % 2:
                junk = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 300)))
            else:
                junk = bytearray(good)
                for _ in range(rng.randint(1, 4)):
                    junk[rng.randrange(len(junk))] ^= 1 << rng.randrange(8)
                junk = bytes(junk)
            neighbour.send(junk)
        deadline = time.monotonic() + 30
        expected = {"authentication": 2002, "replay": 1, "malformed": 1, "unexpected": 2, "oversized": 1}
        while client.call("status")["refused"] != expected and time.monotonic() < deadline:
            time.sleep(0.1)
    assert client.call("status")["refused"] == expected
    assert agent.alive()
    assert psutil.Process(agent.process.pid).memory_info().rss < 1.5e9
    client.call("stop")
    assert client.call("status")["state"] == "free"
