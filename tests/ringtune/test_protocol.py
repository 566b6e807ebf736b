"""One typed definition per control message: every message round-trips through msgpack, and the parser
answers anything else with a ProtocolError naming the field."""
import random

import pytest

from ringtune import control, protocol
from ringtune.lora_spec import LoraSpec
from ringtune.optimizer_spec import OptimizerSpec
from ringtune.plan import even_plan
from ringtune.privacy_spec import PrivacySpec

from helpers import hello_reply

PLAN = even_plan("tiny-llama", 4, ["owner", "pi"], "owner")
REQUESTS = [
    protocol.Hello(), protocol.PairBegin(run="r1"), protocol.PairFinish(agent_nonce=b"a" * 32, nonce=b"n" * 32,
                                                                        proof=b"p" * 32),
    protocol.Calibrate(config={"hidden_size": 64}, lora=LoraSpec(4, 8, ("q_proj",), 3), micro_batch_size=2, seq_len=16,
                       tokenizer="2" * 64),
    protocol.Have(digests=["0" * 64]), protocol.Upload(sha256="0" * 64, offset=0, total=3, data=b"abc"),
    protocol.Assign(run="r1", lineage="0123456789abcdef", plan=PLAN, config={"a": [1, 2]}, hidden_size=64,
                    lora=LoraSpec(), optimizer=OptimizerSpec(lr=0.01, betas=(0.8, 0.9)), micro_batch_size=2,
                    seq_len=16, seed=3, run_key=b"k" * 80, timeout=30.0, encrypt=True,
                    privacy=PrivacySpec("dchi", epsilon=2.0, clip=50.0, seed=7, public=2), slice="1" * 64,
                    tokenizer="2" * 64),
    protocol.Connect(dial={1: "tcp://10.0.0.2:9000"}), protocol.Step(step=4), protocol.Status(), protocol.Lora(),
    protocol.Checkpoint(), protocol.Restore(sha256="0" * 64),
    protocol.KeepCheckpoint(lineage="0123456789abcdef", step=4, sha256="0" * 64),
    protocol.FetchCheckpoint(lineage="0123456789abcdef"), protocol.Stop(), protocol.Shutdown(),
]
REPLIES = [
    protocol.Done(), hello_reply(busy="0123456789abcdef"), protocol.PairBeginReply(agent_id="pi@h", nonce=b"n" * 32),
    protocol.PairFinishReply(proof=b"p" * 32, session="s"), protocol.CalibrateReply(block_seconds=0.25, scored_share=0.04),
    protocol.HaveReply(missing=[]), protocol.UploadReply(complete=True),
    protocol.AssignReply(listen={1: "tcp://10.0.0.2:9000"}),
    protocol.StatusReply(state="idle", rss=1 << 30, peak_rss=1 << 31, refused_control=2, pairing_backoff=1, step=3,
                         result=protocol.StepResult(loss=1.5, tokens=40, stages={
                             0: protocol.StageTiming(0.1, 0.3, 0.05, 0.5, (protocol.Span("F", 0, 0.0, 0.05),
                                                                         protocol.Span("B", 0, 0.4, 0.45))),
                             3: protocol.StageTiming(0.2, 0.2, 0.0, 0.5, ())}, bytes_sent=1000),
                         refused={"replay": 1}),
    protocol.StatusReply(state="error", rss=1, peak_rss=2, refused_control=0, pairing_backoff=0, error="x", ring_broken=True),
    protocol.StagesReply(stages={0: b"\0" * 10}), protocol.FetchCheckpointReply(step=None),
    protocol.FetchCheckpointReply(step=4, state=b"state"),
]


def wire(message: dict) -> dict:
    return control.unpack(control.pack(message))


def test_every_command_has_a_typed_request_and_an_example_here():
    assert {type(r) for r in REQUESTS} == set(protocol.REQUESTS.values())
    assert {type(r) for r in REPLIES} >= {cls.REPLY for cls in protocol.REQUESTS.values()}
    assert protocol.PUBLIC_COMMANDS == {"hello", "pair_begin", "pair_finish"}


@pytest.mark.parametrize("request_", REQUESTS, ids=lambda r: r.CMD)
def test_requests_round_trip(request_):
    fields, blob = protocol.encode_request(request_)
    assert protocol.decode_request(wire(fields), blob) == request_


@pytest.mark.parametrize("reply", REPLIES, ids=lambda r: type(r).__name__)
def test_replies_round_trip(reply):
    request = next(cls for cls in protocol.REQUESTS.values() if cls.REPLY is type(reply))
    assert protocol.decode_reply(request, wire(protocol.encode_reply(reply))) == reply


def test_the_parser_names_the_field_that_is_wrong():
    with pytest.raises(protocol.ProtocolError, match="unknown command 'fly'"):
        protocol.decode_request({"cmd": "fly"})
    with pytest.raises(protocol.ProtocolError, match=r"step: field 'step' is missing"):
        protocol.decode_request({"cmd": "step"})
    with pytest.raises(protocol.ProtocolError, match=r"step.step: expected int, got str"):
        protocol.decode_request({"cmd": "step", "step": "3"})
    with pytest.raises(protocol.ProtocolError, match=r"unknown field\(s\) \['rogue'\]"):
        protocol.decode_request({"cmd": "stop", "rogue": 1})
    fields = protocol.encode_request(REQUESTS[6])[0]
    with pytest.raises(protocol.ProtocolError, match=r"assign.plan.stages\[1\].layers"):
        protocol.decode_request({**fields, "plan": {**fields["plan"], "stages": [fields["plan"]["stages"][0],
                                                                                 {"device": "pi", "layers": "1-4"}]}})
    with pytest.raises(protocol.ProtocolError, match="needs clip"):  # the spec's own check, as a protocol error
        protocol.decode_request({**fields, "privacy": {"hidden": "dchi", "epsilon": 1.0}})
    status = protocol.encode_reply(next(r for r in REPLIES if isinstance(r, protocol.StatusReply)))
    with pytest.raises(protocol.ProtocolError, match=r"status reply: negative byte counts \['peak_rss'\]"):
        protocol.decode_reply(protocol.Status, {**status, "peak_rss": -1})


def test_a_reply_of_another_protocol_version_is_refused_before_its_fields_are_read():
    with pytest.raises(protocol.ProtocolMismatch, match=f"speaks control protocol 2, this coordinator {protocol.PROTOCOL_VERSION}: install"):
        protocol.decode_reply(protocol.Hello, {"ok": True, "protocol": 2, "name": "old"})
    with pytest.raises(protocol.SessionLost, match="agent: gone"):
        protocol.decode_reply(protocol.Status, protocol.error_reply("gone", session_lost=True))


def mutations(rng: random.Random, value):
    """value with one leaf replaced, a key dropped or a key added, anywhere in the structure."""
    if isinstance(value, dict) and value:
        key = rng.choice(list(value))
        roll = rng.random()
        if roll < 0.15:
            return {k: v for k, v in value.items() if k != key}
        if roll < 0.25:
            return {**value, rng.choice(["x", 7, "cmd"]): rng.choice([1, "y", None])}
        return {**value, key: mutations(rng, value[key])}
    if isinstance(value, list) and value and rng.random() < 0.7:
        i = rng.randrange(len(value))
        return value[:i] + [mutations(rng, value[i])] + value[i + 1:]
    return rng.choice([None, True, -1, 0, 2**62, 1.5, float("nan"), float("inf"), "", "head", "x" * 70, b"\0",
                       [], [1, "a"], {}, {"a": 1}, {1: 2}])


def test_ten_thousand_mutated_messages_parse_or_fail_with_a_protocol_error():
    rng = random.Random(15)
    encoded = [protocol.encode_request(r) for r in REQUESTS]
    parsed = 0
    for _ in range(10_000):
        fields, blob = rng.choice(encoded)
        try:
            request = protocol.decode_request(wire(mutations(rng, fields)), blob)
        except protocol.ProtocolError:
            continue
        parsed += 1
        again = protocol.decode_request(wire(protocol.encode_request(request)[0]), protocol.encode_request(request)[1])
        assert repr(again) == repr(request)  # repr: a free-form config may hold NaN, which is not equal to itself
    assert 0 < parsed < 10_000
