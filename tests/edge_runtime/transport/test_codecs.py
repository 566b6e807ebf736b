"""Wire codecs: fp32 is bit for bit, the others bounded by their rounding, at the bytes the planner prices."""
import pytest
import torch

from edge_runtime.transport.codecs import decode, encode, encoded_bytes
from ringtune.wire import CODECS, SLOW_LINK_CODEC, WireError, WireSpec, payload_bytes


def round_trip(codec: str, tensor: torch.Tensor) -> torch.Tensor:
    payload = encode(codec, tensor)
    assert len(payload) == encoded_bytes(codec, tuple(tensor.shape))
    return decode(codec, payload, tuple(tensor.shape))


def test_fp32_is_bit_identical():
    tensor = torch.randn(4, 64, 576) * 1e-30  # subnormal-ish values too
    assert torch.equal(round_trip("fp32", tensor), tensor)


@pytest.mark.parametrize("codec, relative", [("bf16", 2 ** -8), ("fp16", 2 ** -11)])
def test_half_codecs_round_to_nearest(codec, relative):
    tensor = torch.randn(2, 8, 32)
    assert torch.allclose(round_trip(codec, tensor), tensor, rtol=relative, atol=0)


def test_int8_error_is_half_a_step_of_each_tokens_own_scale():
    tensor = torch.randn(2, 8, 32) * torch.logspace(-6, 3, 8).reshape(1, 8, 1)  # tokens of very different size
    decoded = round_trip("int8", tensor)
    # the 8 largest channels of a token travel in bf16, the rest in int8 steps of what is left's absmax / 127
    rest = tensor.abs().sort(dim=-1).values[..., :-8]
    step = rest.amax(dim=-1, keepdim=True) / 127
    error = (decoded - tensor).abs()
    assert torch.all((error <= step / 2 + 1e-6 * step) | (error <= tensor.abs() * 2 ** -8))


def test_int8_keeps_a_tokens_outlier_channels_apart():
    """SmolLM2-like hidden states: a few channels hundreds of times the rest. A plain per-token absmax
    scale would round every other channel to a few levels; with the outliers apart they keep 7 bits."""
    generator = torch.Generator().manual_seed(0)
    tensor = torch.randn(4, 16, 576, generator=generator)
    tensor[..., [7, 100, 311]] = 500 * (1 + torch.rand(4, 16, 3, generator=generator)) * tensor[..., [7, 100, 311]].sign()
    decoded = round_trip("int8", tensor)
    normal = torch.ones(576, dtype=torch.bool)
    normal[[7, 100, 311]] = False
    relative = (decoded - tensor)[..., normal].norm() / tensor[..., normal].norm()
    assert relative < 0.02
    assert torch.allclose(decoded[..., ~normal], tensor[..., ~normal], rtol=1.01 * 2 ** -8, atol=0)  # bf16


def test_int8_refuses_an_outlier_index_outside_the_row():
    payload = bytearray(encode("int8", torch.randn(1, 2, 16)))
    payload[8:10] = (16).to_bytes(2, "little")  # the first token's first outlier index, one past the row
    with pytest.raises(ValueError, match="outside 0..15"):
        decode("int8", payload, (1, 2, 16))


def test_int8_keeps_zero_rows_zero():
    tensor = torch.randn(1, 4, 8)
    tensor[0, 2] = 0  # a pad position's gradient
    assert torch.equal(round_trip("int8", tensor)[0, 2], torch.zeros(8))


def test_bytes_per_token():
    assert [payload_bytes(c, 1, 576) for c in CODECS] == [2304, 1152, 1152, 576 + 4 + 8 * 4]
    assert payload_bytes("int8", 3, 4) == 3 * (4 + 4 + 4 * 4)  # a narrow vector travels all in bf16
    assert WireSpec.parse("int8").bytes_per_token("activation", 576) / 2304 < 0.27


def test_wire_spec_parsing():
    assert WireSpec.parse("int8,int8") == WireSpec("int8", "int8")
    assert WireSpec.parse("fp32") == WireSpec()
    assert WireSpec.resolve("auto", 1e9 / 8) == WireSpec()  # 1 Gbit/s is not slow
    assert WireSpec.resolve("auto", 50e6 / 8) == WireSpec.parse(SLOW_LINK_CODEC) and SLOW_LINK_CODEC != "int8"
    assert WireSpec.resolve("bf16", 50e6 / 8) == WireSpec("bf16", "bf16")
    with pytest.raises(WireError, match="unknown wire codec 'int4': use one of fp32, bf16, fp16, int8"):
        WireSpec.parse("int4")
