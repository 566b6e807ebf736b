"""The exporter's graph rewrites before lowering: each removes what XNNPACK copied or ran outside itself, and the
rewritten graph computes what the traced one did. Pure graph work: no lowering, no executorch."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from edge_runtime.backends.executorch import export

aten = torch.ops.aten


class Products(nn.Module):
    """What AOTAutograd's block graphs hold: a weight product, a weight read back through two transposes, the RMS
    norm backward's powers and its expand, scaled and broadcast, and the rotary backward's halves scattered into
    zeros and added."""

    def forward(self, w, x, r):  # w [d, d], x [T, d], r [T, 1]
        y = torch.mm(x, w.t())  # a forward product: x @ w^T
        dx = torch.mm(y, w.t().t())  # a backward product: w as it is
        squares = x.pow(1) * 2 + x.pow(2) + r.pow(3)
        scaled = r.expand(x.shape) / 4 * x
        zeros = torch.zeros(5, 6)
        halves = zeros.slice_scatter(-x[:, 3:], 1, 3, 6) + zeros.slice_scatter(x[:, :3], 1, 0, 3)
        return y, dx, squares, scaled, halves


def traced():
    inputs = (torch.randn(6, 6), torch.randn(5, 6), torch.randn(5, 1))
    program = torch.export.export(Products(), inputs, strict=False).run_decompositions()
    return program, inputs


def targets(program) -> list:
    return [n.target for n in program.graph_module.graph.nodes if n.op == "call_function"]


def test_rewrites_leave_no_double_transpose_pow_or_expand():
    program, _ = traced()
    before = targets(program)
    assert {aten.pow.Tensor_Scalar, aten.expand.default, aten.slice_scatter.default} <= set(before)
    export._rewrite_for_xnnpack(program)
    after = targets(program)
    assert after.count(aten.linear.default) == 1, "x @ w^T is a linear over w as it is"
    assert aten.permute.default not in after, "no weight is transposed"
    assert aten.pow.Tensor_Scalar not in after and aten.expand.default not in after
    assert aten.slice_scatter.default not in after and aten.full.default not in after


def test_rewritten_graph_computes_the_same():
    program, inputs = traced()
    expected = program.module()(*inputs)
    export._rewrite_for_xnnpack(program)
    for actual, reference in zip(program.module()(*inputs), expected, strict=True):
        torch.testing.assert_close(actual, reference, rtol=0, atol=0)


@pytest.mark.parametrize("other_shape", [(5, 6), (5, 1)])
def test_expand_stays_when_the_binary_op_would_not_restore_its_shape(other_shape):
    class Scaled(nn.Module):
        def forward(self, r, other):
            return r.expand(5, 6) / 4 * other

    program = torch.export.export(Scaled(), (torch.randn(5, 1), torch.randn(*other_shape)), strict=False)
    program = program.run_decompositions()
    export._rewrite_for_xnnpack(program)
    assert (aten.expand.default in targets(program)) == (other_shape == (5, 1))
