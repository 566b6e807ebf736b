import msgpack
import pytest
import torch

from edge_runtime.transport.frames import FrameError, FrameHeader, decode_frame, encode_frame

KEY = b"k" * 32


def frame(tensor=None, **overrides):
    tensor = torch.arange(12, dtype=torch.float32).reshape(1, 3, 4) if tensor is None else tensor
    fields = dict(run="r1", step=2, microbatch=1, kind="activation", dtype="float32", shape=tuple(tensor.shape))
    fields.update(overrides)
    return encode_frame(FrameHeader(**fields), tensor, KEY)


def test_round_trip_keeps_header_and_bits():
    tensor = torch.randn(2, 3, 4)
    header, decoded = decode_frame(frame(tensor), KEY, 1 << 20)
    assert header == FrameHeader("r1", 2, 1, "activation", "float32", (2, 3, 4))
    assert torch.equal(decoded, tensor)


def test_flipped_bit_fails_the_mac():
    data = bytearray(frame())
    data[10] ^= 1
    with pytest.raises(FrameError, match="bad MAC"):
        decode_frame(bytes(data), KEY, 1 << 20)


def test_wrong_key_fails_the_mac():
    with pytest.raises(FrameError, match="bad MAC"):
        decode_frame(frame(), b"x" * 32, 1 << 20)


def test_oversized_frame_is_refused_before_parsing():
    with pytest.raises(FrameError, match="exceeds the limit"):
        decode_frame(frame(), KEY, 64)


def test_payload_not_matching_shape_is_refused():
    with pytest.raises(FrameError, match="payload has 48 bytes, header says 96"):
        decode_frame(frame(shape=(2, 3, 4)), KEY, 1 << 20)


def _sealed(body: bytes) -> bytes:
    import hashlib
    import hmac
    return body + hmac.digest(KEY, body, hashlib.sha256)


@pytest.mark.parametrize("header", [b"\xc1\xc1", msgpack.packb([1, 2]), msgpack.packb(["r", 0, 0, "x", "float32", [1], "raw"]),
                                    msgpack.packb(["r", 0, 0, "activation", "int64", [1], "raw"])])
def test_malformed_headers_are_refused(header):
    body = len(header).to_bytes(4, "big") + header + b"\0" * 4
    with pytest.raises(FrameError):
        decode_frame(_sealed(body), KEY, 1 << 20)


def test_random_bytes_only_ever_raise_frame_error():
    generator = torch.Generator().manual_seed(0)
    good = frame()
    for i in range(2000):
        length = int(torch.randint(0, 200, (1,), generator=generator))
        data = bytes(torch.randint(0, 256, (length,), generator=generator, dtype=torch.uint8).tolist())
        if i % 2:  # valid MAC around garbage: exercises the parser, not just the MAC check
            data = _sealed(good[:4] + data)
        with pytest.raises(FrameError):
            decode_frame(data, KEY, 1 << 20)
