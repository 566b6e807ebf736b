"""Tiled compute on compact weights: the same products as fp32 matmuls on the dequantized weight."""
from __future__ import annotations

import threading

import pytest
import torch

from edge_runtime.models.quantization import TILE_ELEMENTS, CompactWeight, _TiledLinear, dequantized, quantize


@pytest.mark.parametrize("dtype", ["bf16", "int8", "int4"])
def test_tiled_forward_and_input_gradient_equal_fp32_matmuls_on_the_dequantized_weight(dtype):
    """Three tiles, the last one short: int8's scales on the output and the output gradient give the same
    values as scaling every weight, to float rounding."""
    columns = 1024
    rows = 2 * TILE_ELEMENTS // columns + 52  # [2100, 1024]
    torch.manual_seed(0)
    weight = torch.randn(rows, columns) * 0.02
    compact = CompactWeight(dtype, quantize(weight, dtype), columns)
    x = torch.randn(2, 5, columns, requires_grad=True)  # [B, T, in]
    y = _TiledLinear.apply(x, compact)  # [B, T, out]
    dy = torch.randn_like(y)
    (grad_x,) = torch.autograd.grad(y, x, dy)
    plain = dequantized(weight, dtype)
    torch.testing.assert_close(y, x.detach() @ plain.T, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_x, dy @ plain, rtol=1e-5, atol=1e-6)


def test_threads_computing_at_once_each_use_their_own_tile_buffer():
    """The owner runs its head and tail in two threads: a shared buffer would mix their tiles."""
    columns = 512
    torch.manual_seed(1)
    weights = [torch.randn(3 * TILE_ELEMENTS // columns, columns) * 0.02 for _ in range(2)]
    compact = [CompactWeight("int8", quantize(w, "int8"), columns) for w in weights]
    x = torch.randn(8, columns)
    expected = [x @ dequantized(w, "int8").T for w in weights]
    results: dict[int, list[torch.Tensor]] = {0: [], 1: []}

    def run(index: int) -> None:
        for _ in range(5):
            results[index].append(_TiledLinear.apply(x, compact[index]))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index in range(2):
        for result in results[index]:
            torch.testing.assert_close(result, expected[index], rtol=1e-5, atol=1e-6)  # a mixed tile: ~1e-1
