import msgpack
import pytest
import torch

from edge_runtime.transport.frames import FrameError, FrameHeader, pack_frame, unpack_frame
from ringtune.wire import CODECS


def test_round_trip_keeps_header_and_bits():
    tensor = torch.randn(2, 3, 4)
    header = FrameHeader("r1", 2, 1, "activation", "float32", (2, 3, 4))
    decoded_header, decoded = unpack_frame(*pack_frame(header, tensor))
    assert decoded_header == header
    assert torch.equal(decoded, tensor)


def test_payload_not_matching_shape_is_refused():
    head, payload = pack_frame(FrameHeader("r", 0, 0, "gradient", "float32", (2, 3, 4)), torch.zeros(1, 3, 4))
    with pytest.raises(FrameError, match="payload has 48 bytes, header says 96"):
        unpack_frame(head, payload)


@pytest.mark.parametrize("head", [b"\xc1\xc1", msgpack.packb([1, 2]), msgpack.packb(["r", 0, 0, "x", "float32", [1], "fp32"]),
                                  msgpack.packb(["r", 0, 0, "activation", "int64", [1], "fp32"]),
                                  msgpack.packb(["r", 0, 0, "activation", "float32", [-1], "fp32"]),
                                  msgpack.packb(["r", 0, 0, "activation", "float32", [1], "zip"]),
                                  b"\x00" * 5000])
def test_malformed_headers_are_refused(head):
    with pytest.raises(FrameError):
        unpack_frame(head, b"\0" * 4)


def test_random_headers_only_ever_raise_frame_error():
    generator = torch.Generator().manual_seed(0)
    good, payload = pack_frame(FrameHeader("r", 0, 0, "activation", "float32", (1,)), torch.zeros(1))
    for _ in range(3000):
        head = bytearray(good)
        for _ in range(int(torch.randint(1, 4, (1,), generator=generator))):
            head[int(torch.randint(0, len(head), (1,), generator=generator))] = int(torch.randint(0, 256, (1,), generator=generator))
        try:
            unpack_frame(bytes(head), payload)
        except FrameError:
            pass


@pytest.mark.parametrize("codec", CODECS)
def test_every_codec_names_itself_and_round_trips(codec):
    tensor = torch.randn(2, 3, 16)
    header = FrameHeader("r1", 0, 0, "gradient", "float32", (2, 3, 16), codec)
    decoded_header, decoded = unpack_frame(*pack_frame(header, tensor))
    assert decoded_header.codec == codec and decoded.dtype == torch.float32
    assert torch.allclose(decoded, tensor, atol=0.02 * float(tensor.abs().max()))


def test_a_payload_of_another_codec_is_refused():
    _, payload = pack_frame(FrameHeader("r", 0, 0, "activation", "float32", (2, 3, 8), "int8"), torch.zeros(2, 3, 8))
    bf16_head, _ = pack_frame(FrameHeader("r", 0, 0, "activation", "float32", (2, 3, 8), "bf16"), torch.zeros(2, 3, 8))
    with pytest.raises(FrameError, match="payload has 264 bytes, header says 96"):
        unpack_frame(bf16_head, payload)
