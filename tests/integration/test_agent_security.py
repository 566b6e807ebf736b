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
from ringtune import control, protocol
from ringtune.optimizer_spec import OptimizerSpec
from ringtune.plan import even_plan
from ringtune.privacy_spec import PrivacySpec
from ringtune.protocol import Assign, ControlError, Hello, Status, Stop, Timeouts
from ringtune.security import FrameAuthenticator, link_key, new_key, wrap_key

FUZZ_FRAMES = 10_000

pytestmark = pytest.mark.slow


@pytest.fixture
def agent(tmp_path):
    process = AgentProcess("guarded", tmp_path / "agent")
    yield process
    process.stop()


def paired(url, run="run-1", token=TOKEN):
    client = AgentClient(url, Timeouts(heartbeat=10))
    client.pair(token, run)
    return client


def test_wrong_token_is_refused_on_both_sides_and_the_agent_keeps_serving(agent):
    intruder = AgentClient(agent.url, Timeouts(heartbeat=10))
    with pytest.raises(PairingFailed, match="wrong token"):
        intruder.pair("not-the-token-at-all-0000", "run-x")
    with pytest.raises(ControlError, match="needs a paired session"):
        intruder.request(Status())
    with pytest.raises(ControlError, match=r"1 failed pairing\(s\) from 127.0.0.1: try again in"):
        intruder.pair("not-the-token-at-all-0000", "run-x")  # too soon after a failure: backed off
    time.sleep(1.1)  # the first failure costs its address 1 s
    client = paired(agent.url)
    status = client.request(Status())
    assert status.refused_control == 2 and status.pairing_backoff == 1
    assert "refused a coordinator at 127.0.0.1 that does not know the pairing token" in agent.log.read_text()
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


def mutated(rng: random.Random, message: dict) -> dict:
    """A control map with one field dropped, retyped or added (what a buggy or hostile peer sends)."""
    message = dict(message)
    key = rng.choice(sorted(message))
    choice = rng.randrange(4)
    if choice == 0:
        del message[key]
    elif choice == 1:
        message[key] = rng.choice([None, -1, 2**62, 1.5, "x", b"\0" * 3, [], {}, {"a": [1]}, True])
    elif choice == 2:
        message["extra"] = 1
    else:
        message["cmd"] = rng.choice(sorted(set(protocol.REQUESTS) - {"shutdown"}) + ["nope", "", 7])
    return message


def test_fuzzed_control_messages_never_crash_or_hang_the_agent(agent):
    """Random bytes, flipped bytes and forged seals in the clear; mutated typed messages inside a genuine
    session (past the seal, into the parser): FUZZ_FRAMES in all, every one answered with an error map."""
    rng = random.Random(0)
    valid = control.pack({"cmd": "hello"})
    client = paired(agent.url)
    rss_before = psutil.Process(agent.process.pid).memory_info().rss
    typed = [protocol.encode_request(m)[0] for m in (Status(), Stop(), protocol.Step(step=3),
                                                     protocol.Restore(sha256="0" * 64), protocol.Have(digests=[]))]
    refused_before = client.request(Status()).refused_control
    with pynng.Req0(dial=agent.url, recv_timeout=5000, send_timeout=5000) as raw:
        for i in range(FUZZ_FRAMES):
            kind = i % 4
            if kind == 0:
                data = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64)))
            elif kind == 1:
                data = bytearray(valid)
                data[rng.randrange(len(data))] = rng.getrandbits(8)
                data = bytes(data)
            elif kind == 2:
                data = control.pack({"session": "x", "sealed": secrets.token_bytes(rng.randint(0, 80)),
                                     "cmd": rng.choice(["step", "assign", "upload", "status"])})
            else:
                data = control.pack({"session": client._session,
                                     "sealed": client._channel.seal(mutated(rng, rng.choice(typed)))})
            raw.send(data)
            reply = msgpack.unpackb(raw.recv())
            assert isinstance(reply, dict)
            if kind == 3:  # the agent answers through the session: open it like the coordinator would
                opened, _ = client._channel.open(reply["sealed"])
                assert isinstance(opened, dict) and "ok" in opened
    with pynng.Req0(dial=agent.url, send_timeout=5000) as raw:  # dropped by the size limit: no reply
        raw.send(control.pack({"cmd": "x" * (protocol.MAX_REQUEST_BYTES + 1)}))
    assert agent.alive()
    assert client.request(Status()).refused_control > refused_before  # malformed typed messages are counted
    assert paired(agent.url).request(Hello()).name == "guarded"
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
    reply = client.request(Assign(run=run, lineage="0123456789abcdef", plan=plan, config=shipment.config,
                                  hidden_size=shipment.hidden_size, slice=shipment.slices["guarded"].sha256,
                                  lora=lora, optimizer=OptimizerSpec(), micro_batch_size=1, seq_len=8, seed=0,
                                  run_key=wrap_key(client.session_key, run_key), timeout=30.0, encrypt=False,
                                  privacy=PrivacySpec()))
    listen = reply.listen[1]
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
        for i in range(FUZZ_FRAMES):  # fuzz: random bytes, and good frames with bytes flipped
            if i % 2:
                junk = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 300)))
            else:
                junk = bytearray(good)
                for _ in range(rng.randint(1, 4)):
                    junk[rng.randrange(len(junk))] ^= 1 << rng.randrange(8)
                junk = bytes(junk)
            neighbour.send(junk)
        deadline = time.monotonic() + 30
        expected = {"authentication": FUZZ_FRAMES + 2, "replay": 1, "malformed": 1, "unexpected": 2, "oversized": 1}
        while client.request(Status()).refused != expected and time.monotonic() < deadline:
            time.sleep(0.1)
    assert client.request(Status()).refused == expected
    assert agent.alive()
    assert psutil.Process(agent.process.pid).memory_info().rss < 1.5e9
    client.request(Stop())
    assert client.request(Status()).state == "free"
