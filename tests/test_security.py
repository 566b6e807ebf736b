"""Pairing tokens, the handshake, session and link keys, and authenticated frames (MAC and AEAD)."""
from __future__ import annotations

import random
import stat
import struct

import pytest

from ringtune import security
from ringtune.security import (AgentHandshake, AuthError, CoordinatorHandshake,
                               FrameAuthenticator, ReplayError, TokenError, check_token, generate_token,
                               link_key, load_or_create_token, new_key, unwrap_key, wrap_key)

MODES = [False, True]


def handshake(agent_token: str, coordinator_token: str, run: str = "run-1") -> tuple[bytes, bytes]:
    """Run both sides of the handshake in memory; (agent's session key, coordinator's)."""
    agent = AgentHandshake(agent_token, "agent-1", run)
    coordinator = CoordinatorHandshake(coordinator_token, "agent-1", run)
    nonce, proof = coordinator.answer(agent.nonce)
    agent_proof, agent_key = agent.verify(nonce, proof)
    return agent_key, coordinator.finish(agent_proof)


# --- tokens ------------------------------------------------------------------------------------

def test_token_is_created_once_private_and_then_reused(tmp_path) -> None:
    token, created = load_or_create_token(tmp_path / "state")
    assert created and len(token) >= 40
    assert stat.S_IMODE((tmp_path / "state" / "token").stat().st_mode) == 0o600
    assert load_or_create_token(tmp_path / "state") == (token, False)


def test_a_token_file_readable_by_others_is_refused_with_the_fix(tmp_path) -> None:
    load_or_create_token(tmp_path)
    (tmp_path / "token").chmod(0o644)
    with pytest.raises(TokenError, match="chmod 600"):
        load_or_create_token(tmp_path)


def test_a_corrupt_token_file_says_to_delete_it(tmp_path) -> None:
    (tmp_path / "token").write_text("short\n")
    (tmp_path / "token").chmod(0o600)
    with pytest.raises(TokenError, match="delete it"):
        load_or_create_token(tmp_path)


def test_short_tokens_are_refused() -> None:
    with pytest.raises(TokenError, match="at least 16"):
        check_token("hunter2")
    assert check_token(f"  {'x' * 16}\n") == "x" * 16


# --- handshake ---------------------------------------------------------------------------------

def test_right_token_gives_both_sides_the_same_fresh_session_key() -> None:
    token = generate_token()
    agent_key, coordinator_key = handshake(token, token)
    assert agent_key == coordinator_key and len(agent_key) == 32
    assert handshake(token, token)[0] != agent_key  # new nonces, new key
    assert token.encode() not in agent_key


def test_wrong_token_is_refused_by_the_agent_with_a_clear_message() -> None:
    with pytest.raises(AuthError, match="does not know this agent's pairing token"):
        handshake(generate_token(), generate_token())


def test_an_impostor_agent_is_refused_by_the_coordinator() -> None:
    token = generate_token()
    coordinator = CoordinatorHandshake(token, "agent-1", "run-1")
    coordinator.answer(bytes(32))
    with pytest.raises(AuthError, match="could not prove the pairing token"):
        coordinator.finish(bytes(32))


def test_the_coordinators_proof_cannot_be_reflected_as_the_agents() -> None:
    token = generate_token()
    agent = AgentHandshake(token, "agent-1", "run-1")
    coordinator = CoordinatorHandshake(token, "agent-1", "run-1")
    _, proof = coordinator.answer(agent.nonce)
    with pytest.raises(AuthError):
        coordinator.finish(proof)


def test_proofs_are_bound_to_the_agent_and_run() -> None:
    token = generate_token()
    agent = AgentHandshake(token, "agent-1", "run-1")
    nonce, proof = CoordinatorHandshake(token, "agent-1", "run-2").answer(agent.nonce)
    with pytest.raises(AuthError):
        agent.verify(nonce, proof)


def test_malformed_handshake_messages_are_auth_errors() -> None:
    token = generate_token()
    with pytest.raises(AuthError, match="32 bytes"):
        CoordinatorHandshake(token, "a", "r").answer(b"short")
    with pytest.raises(AuthError, match="out of order"):
        CoordinatorHandshake(token, "a", "r").finish(bytes(32))


# --- keys --------------------------------------------------------------------------------------

def test_a_wrapped_run_key_reaches_the_agent_and_resists_tampering() -> None:
    session, run_key = new_key(), new_key()
    wrapped = wrap_key(session, run_key)
    assert run_key not in wrapped
    assert unwrap_key(session, wrapped) == run_key
    tampered = bytearray(wrapped)
    tampered[20] ^= 1
    for bad_session, bad_wrapped in ((session, bytes(tampered)), (new_key(), wrapped), (session, wrapped[:-1])):
        with pytest.raises(AuthError):
            unwrap_key(bad_session, bad_wrapped)


def test_keys_are_the_ones_the_hand_written_hkdf_derived() -> None:
    """Known vectors from the HKDF ringtune used before cryptography's: both ends derive the same keys."""
    key = bytes(range(32))
    assert link_key(key, "stage 0", "stage 1").hex() == \
        "61a6b3f2693dc01604f19aaade330a5578a37123a4bec3ba17f756e5ae056283"
    assert security._session_key(b"token-token-token-1234", bytes(32), bytes([1]) * 32,
                                 security._fields("pi-a", "run1")).hex() == \
        "369740d8f59db1203be3ae191a1999535d75dc614b54e7c3035690828cd08d04"
    assert security._hkdf(key, salt=b"salt", info=b"info", length=64).hex() == (
        "64cc2a23b7a1da4310420350405fdf5d632cb9bda3700d753e96cbcfeb81d449"
        "6259e7075d6da9d2c3255e8bdc4de030b56bfb17845e036d962918c0a2ff6cac")


def test_hkdf_is_rfc_5869() -> None:
    """RFC 5869 test case 1 (SHA-256)."""
    okm = security._hkdf(bytes([0x0b] * 22), salt=bytes(range(13)), info=bytes(range(0xf0, 0xfa)), length=42)
    assert okm.hex() == ("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf"
                         "34007208d5b887185865")


def test_the_run_key_is_wrapped_with_rfc_3394() -> None:
    """A wrap is AES key wrap under the session's wrapping key: deterministic, 8 bytes longer."""
    session, run_key = bytes(range(32)), bytes(range(32, 64))
    wrapped = wrap_key(session, run_key)
    assert len(wrapped) == 40 and wrap_key(session, run_key) == wrapped
    from cryptography.hazmat.primitives.keywrap import aes_key_unwrap
    assert aes_key_unwrap(security._wrapping_key(session), wrapped) == run_key


def test_each_link_direction_has_its_own_key() -> None:
    run_key = new_key()
    assert link_key(run_key, "stage0", "stage1") != link_key(run_key, "stage1", "stage0")
    assert link_key(run_key, "stage0", "stage1") == link_key(run_key, "stage0", "stage1")
    assert link_key(run_key, "ab", "c") != link_key(run_key, "a", "bc")


# --- frames ------------------------------------------------------------------------------------

def pair(encrypt: bool, key: bytes | None = None) -> tuple[FrameAuthenticator, FrameAuthenticator]:
    key = key or link_key(new_key(), "stage0", "stage1")
    return FrameAuthenticator(key, encrypt=encrypt), FrameAuthenticator(key, encrypt=encrypt)


@pytest.mark.parametrize("encrypt", MODES)
def test_a_sealed_frame_opens_to_its_header_and_payload(encrypt: bool) -> None:
    sender, receiver = pair(encrypt)
    payload = bytes(range(256)) * 64
    frame = sender.seal(b"header", memoryview(payload))
    assert len(frame) == len(b"header") + len(payload) + sender.overhead
    assert (payload in frame) is not encrypt
    header, opened = receiver.open(frame)
    assert header == b"header" and bytes(opened) == payload
    assert receiver.open(sender.seal(b"", b""))[0] == b""


@pytest.mark.parametrize("encrypt", MODES)
def test_any_flipped_bit_is_detected(encrypt: bool) -> None:
    sender, receiver = pair(encrypt)
    frame = sender.seal(b"head", b"payload bytes")
    for position in range(len(frame)):
        tampered = bytearray(frame)
        tampered[position] ^= 0x10
        with pytest.raises(AuthError):
            receiver.open(bytes(tampered))
    receiver.open(frame)  # failed attempts did not move the replay window


@pytest.mark.parametrize("encrypt", MODES)
def test_replays_and_older_frames_are_refused_but_gaps_are_fine(encrypt: bool) -> None:
    sender, receiver = pair(encrypt)
    first, lost, third = (sender.seal(b"h", bytes([n])) for n in range(3))
    receiver.open(first)
    with pytest.raises(ReplayError):
        receiver.open(first)
    assert bytes(receiver.open(third)[1]) == b"\x02"  # frame 2 was lost on the way: fine
    with pytest.raises(ReplayError, match="last accepted #3"):
        receiver.open(lost)


def test_frames_do_not_open_with_another_key_or_direction() -> None:
    run_key = new_key()
    forward = FrameAuthenticator(link_key(run_key, "stage0", "stage1"))
    backward = FrameAuthenticator(link_key(run_key, "stage1", "stage0"))
    with pytest.raises(AuthError, match="bad MAC"):
        backward.open(forward.seal(b"h", b"activation"))  # reflected back at its sender
    with pytest.raises(AuthError, match="bad MAC"):
        FrameAuthenticator(new_key()).open(forward.seal(b"h", b"activation"))


def test_encryption_must_match_on_both_ends() -> None:
    key = new_key()
    with pytest.raises(AuthError, match="agree on encryption"):
        FrameAuthenticator(key).open(FrameAuthenticator(key, encrypt=True).seal(b"h", b"p"))


def test_bad_keys_are_refused_up_front() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        FrameAuthenticator(b"short")


def mutate(frame: bytes, rng: random.Random) -> bytes:
    data = bytearray(frame)
    match rng.randrange(6):
        case 0:
            return bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 64)))
        case 1:
            for _ in range(rng.randrange(1, 4)):
                data[rng.randrange(len(data))] = rng.getrandbits(8)
        case 2:
            del data[rng.randrange(len(data)):]
        case 3:
            data += bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 40)))
        case 4:  # lie about the header length
            struct.pack_into(">I", data, 12, rng.choice([0, 1, len(data), 2**32 - 1, rng.getrandbits(32)]))
        case 5:  # a valid frame from another key
            return FrameAuthenticator(new_key()).seal(b"h", bytes(rng.randrange(64)))
    return bytes(data)


@pytest.mark.parametrize("encrypt", MODES)
def test_fuzzed_frames_only_ever_raise_auth_errors(encrypt: bool) -> None:
    rng = random.Random(1234)
    sender, receiver = pair(encrypt)
    valid = [sender.seal(bytes(rng.randrange(40)), bytes(rng.randrange(300))) for _ in range(20)]
    for _ in range(3000):
        frame = mutate(rng.choice(valid), rng)
        if frame in valid:
            continue  # the mutation happened to change nothing
        try:
            receiver.open(frame)
        except AuthError:
            continue
        pytest.fail("a mutated frame was accepted")
    assert receiver.open(valid[-1])  # the receiver still works, and nothing advanced its window
