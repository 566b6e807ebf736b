"""Compact frozen base weights: bf16, or weight-only int8 / int4 with scales, computed with fp32 matmuls.

Only the frozen base weights of linear layers (the blocks' projections and the LM head, GPT-2's Conv1D
included) and of token/position embeddings are stored compactly; LoRA tensors, their gradients,
AdamW state, norms, biases and activations stay fp32.

- ``bf16``: the weight rounded to bfloat16.
- ``int8``: symmetric, one fp32 scale per output channel: ``w ~ q * scale``, q in [-127, 127].
- ``int4``: one bf16 scale per group of 32 inputs (llama.cpp's Q4_0 rule: the value of largest
  magnitude maps to -8), two 4-bit codes per byte.

Compute never uses packed low-precision kernels (torch's int8/int4 CPU kernels ran 35-75x slower than
fp32 here) nor bf16 matmuls (fast only on CPUs with bf16 instructions, which Raspberry Pis lack): a tile
of rows is dequantized to fp32 and multiplied in fp32, for ``x @ W.T`` forward and ``dy @ W`` backward,
so a tile at a time is all the fp32 weight that exists. int8's per-row scale is applied to the matmul's
output (forward) and to the output gradient (backward) instead of to every weight: a tile is then the
codes cast to fp32, one pass over the weight instead of two (benchmarks/README.md, base_dtype.py).
Quantizing is a pure function of one weight tensor, so every split of the model computes with the same
values.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ringtune.base_dtype import BaseDtypeError, check_base_dtype

GROUP = 32
"""Inputs per int4 scale."""
TILE_ELEMENTS = 1 << 20
"""Weight elements dequantized at once, into one reused 4 MB fp32 buffer (fewer, larger matmuls than 1 MB
tiles: one int8 layer at 0.93-1.11x fp32 against 1.01-1.16x, benchmarks/README.md)."""
QUANTIZE_ELEMENTS = 1 << 22
"""Weight elements quantized at once (16 MB of fp32 temporaries)."""
BYTES_PER_WEIGHT = {"fp32": 4.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5}
"""Bytes per weight element, scales left out (they add 4 / in_features for int8, 2 / 32 for int4)."""


def compact_layout(rows: int, columns: int, dtype: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The tensors that store a [rows, columns] weight: name -> (shape, dtype)."""
    if dtype == "bf16":
        return {"weight": ((rows, columns), torch.bfloat16)}
    if dtype == "int8":
        return {"qweight": ((rows, columns), torch.int8), "scales": ((rows,), torch.float32)}
    if dtype == "int4":
        return {"qweight": ((rows, columns // 2), torch.uint8), "scales": ((rows, _groups(columns)), torch.bfloat16)}
    raise BaseDtypeError(f"{dtype!r} weights are not stored compactly")


def quantize(weight: torch.Tensor, dtype: str) -> dict[str, torch.Tensor]:
    """weight [rows, columns] (fp32) -> its compact tensors (``compact_layout``'s names). Rows are quantized
    a block at a time (every scale is per row), so the temporaries stay small next to a large embedding."""
    rows, columns = weight.shape
    out = {name: torch.empty(shape, dtype=dt) for name, (shape, dt) in compact_layout(rows, columns, dtype).items()}
    step = max(1, QUANTIZE_ELEMENTS // columns)
    for start in range(0, rows, step):
        for name, part in _quantize_rows(weight[start:start + step], dtype).items():
            out[name][start:start + step] = part
    return out


def _quantize_rows(weight: torch.Tensor, dtype: str) -> dict[str, torch.Tensor]:
    weight = weight.detach().to(torch.float32)
    if dtype == "bf16":
        return {"weight": weight.to(torch.bfloat16)}
    if dtype == "int8":
        scales = weight.abs().amax(dim=1) / 127  # [rows]
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))
        return {"qweight": torch.round(weight / scales[:, None]).clamp_(-127, 127).to(torch.int8), "scales": scales}
    if dtype == "int4":
        rows, columns = weight.shape
        groups = weight.reshape(rows, _groups(columns), -1)  # [rows, G, columns / G]
        extreme = groups.gather(2, groups.abs().argmax(dim=2, keepdim=True))  # signed value of largest magnitude
        scales = (extreme / -8).to(torch.bfloat16)  # [rows, G, 1]
        wide = scales.to(torch.float32)
        inverse = torch.where(wide != 0, 1 / wide, torch.zeros_like(wide))
        codes = (torch.round(groups * inverse) + 8).clamp_(0, 15).to(torch.uint8).reshape(rows, columns)
        return {"qweight": codes[:, 0::2] | (codes[:, 1::2] << 4), "scales": scales[..., 0]}
    raise BaseDtypeError(f"{dtype!r} weights are not stored compactly")


def _groups(columns: int) -> int:
    """int4 groups per row: 32 inputs each, or the whole row when it does not divide."""
    if columns % 2:
        raise BaseDtypeError(f"int4 packs two weights per byte: a layer with {columns} inputs cannot be stored")
    return columns // GROUP if columns % GROUP == 0 else 1


_NIBBLES = torch.stack([torch.arange(256) & 15, torch.arange(256) >> 4], dim=1).to(torch.float32) - 8  # [256, 2]


@dataclass(frozen=True, slots=True)
class CompactWeight:
    """A [rows, columns] weight in its compact tensors, dequantized a block of rows at a time."""
    dtype: str
    """bf16, int8 or int4."""
    tensors: dict[str, torch.Tensor]
    """Its tensors (``compact_layout``)."""
    columns: int
    """Inputs per row."""

    @property
    def rows(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def dequantize(self, index: slice | torch.Tensor = slice(None)) -> torch.Tensor:
        """The fp32 rows at index (a slice, or row ids of any shape: [..., columns])."""
        t = self.tensors
        if self.dtype == "bf16":
            return t["weight"][index].to(torch.float32)
        if self.dtype == "int8":
            return t["qweight"][index].to(torch.float32) * t["scales"][index].unsqueeze(-1)
        packed = t["qweight"][index]
        codes = _NIBBLES.to(packed.device)[packed.long()]  # [..., columns / 2, 2]
        scales = t["scales"][index].to(torch.float32)  # [..., G]
        grouped = codes.reshape(*scales.shape, -1)  # [..., G, columns / G]
        return (grouped * scales.unsqueeze(-1)).reshape(*scales.shape[:-1], self.columns)

    def row_scales(self) -> torch.Tensor | None:
        """int8's per-row scales [rows], which ``tiles`` leave out for the matmul to apply to its output;
        None for dtypes whose tiles are the weight itself."""
        return self.tensors["scales"] if self.dtype == "int8" else None

    def tiles(self):
        """(first row, fp32 rows [n, columns]) for consecutive blocks of rows, without ``row_scales``.
        The rows live in one buffer that the next tile overwrites: use them before asking for the next."""
        step = min(self.rows, max(1, TILE_ELEMENTS // self.columns))
        stored = self.tensors["weight" if self.dtype == "bf16" else "qweight"]
        buffer = _tile_buffer(stored.device)[:step * self.columns].view(step, self.columns)
        for start in range(0, self.rows, step):
            rows = buffer[:min(step, self.rows - start)]
            if self.dtype == "int4":
                rows.copy_(self.dequantize(slice(start, start + step)))
            else:  # bf16 upcast, or int8 codes (their scales go to the output)
                rows.copy_(stored[start:start + step])
            yield start, rows


_THREAD = threading.local()


def _tile_buffer(device: torch.device) -> torch.Tensor:
    """TILE_ELEMENTS fp32 for tiles, one per thread, kept between calls: an agent maps every block of 4 MB
    or more afresh (edge_runtime.memory), and faulting in a new 4 MB tile buffer on every call made an int8
    layer 3.6x slower than fp32 at 32 tokens. On the meta device (cost tables) a fresh one, so the traced
    workspace holds it."""
    if device.type == "meta":
        return torch.empty(TILE_ELEMENTS, device=device)
    if getattr(_THREAD, "tile_buffer", None) is None:
        _THREAD.tile_buffer = torch.empty(TILE_ELEMENTS)
    return _THREAD.tile_buffer


class _TiledLinear(torch.autograd.Function):
    """y = x @ W.T with W dequantized a tile of rows at a time; the input gradient dy @ W the same way.
    int8: y = (x @ Q.T) * scales and dy @ W = (dy * scales) @ Q, Q the codes as fp32.
    The weight is frozen: nothing is saved for backward but a reference to its compact tensors."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: CompactWeight) -> torch.Tensor:
        ctx.weight = weight
        flat = x.reshape(-1, weight.columns)  # [N, in]
        out = flat.new_empty(flat.shape[0], weight.rows)  # [N, out]
        for start, rows in weight.tiles():
            torch.mm(flat, rows.T, out=out[:, start:start + rows.shape[0]])  # a strided view: BLAS writes it in place
        scales = weight.row_scales()
        if scales is not None:
            out.mul_(scales)
        return out.reshape(*x.shape[:-1], weight.rows)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight = ctx.weight
        flat = grad.reshape(-1, weight.rows)  # [N, out]
        scales = weight.row_scales()
        if scales is not None:
            flat = flat * scales
        grad_x = flat.new_zeros(flat.shape[0], weight.columns)  # [N, in]
        for start, rows in weight.tiles():  # addmm with out=, not addmm_: FLOP counters see it (cost table)
            torch.addmm(grad_x, flat[:, start:start + rows.shape[0]], rows, out=grad_x)
        return grad_x.reshape(*grad.shape[:-1], weight.columns), None


class CompactLinear(nn.Module):
    """A frozen linear layer (``nn.Linear``, or GPT-2's ``Conv1D`` stored transposed) with compact weights."""

    def __init__(self, in_features: int, out_features: int, dtype: str, tensors: dict[str, torch.Tensor],
                 bias: nn.Parameter | None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.dtype = in_features, out_features, dtype
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor)
        self.bias = bias  # the layer's own (frozen, fp32) bias

    def weights(self) -> list[torch.Tensor]:
        """The tensors its weight is stored in."""
        return list(self._buffers.values())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = CompactWeight(self.dtype, {n: b for n, b in self._buffers.items()}, self.in_features)
        y = _TiledLinear.apply(x, weight)
        return y if self.bias is None else y + self.bias


class CompactEmbedding(nn.Module):
    """A frozen token (or position) embedding with compact weights: looked-up rows are dequantized, then
    multiplied by the embedding's scale if it has one (Gemma's scaled word embedding)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: str, tensors: dict[str, torch.Tensor],
                 embed_scale: torch.Tensor | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.dtype = num_embeddings, embedding_dim, dtype
        self._weights = tuple(tensors)
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor)
        if embed_scale is not None:
            self.register_buffer("embed_scale", embed_scale, persistent=False)

    def weights(self) -> list[torch.Tensor]:
        """The tensors its weight is stored in."""
        return [self._buffers[n] for n in self._weights]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        weight = CompactWeight(self.dtype, {n: self._buffers[n] for n in self._weights}, self.embedding_dim)
        rows = weight.dequantize(ids)  # [..., dim]
        return rows * self.embed_scale.to(rows.dtype) if "embed_scale" in self._buffers else rows


def compact_weights(module: nn.Module) -> list[torch.Tensor]:
    """The compact weight tensors in module (buffers, where fp32 weights are parameters)."""
    return [t for m in module.modules() if isinstance(m, (CompactLinear, CompactEmbedding)) for t in m.weights()]


@dataclass(frozen=True, slots=True)
class WeightOrigin:
    """Where a compact tensor comes from: which fp32 weight, which of its compact parts, and how."""
    weight: nn.Parameter
    """The original weight (meta on a skeleton)."""
    part: str
    """Name in ``compact_layout``."""
    transposed: bool
    """Conv1D stores [in, out]: the compact form is of its transpose."""


def compact_targets(model: nn.Module) -> dict[int, bool]:
    """The frozen weights stored compactly, by id: whether each is stored transposed (Conv1D). Those of linear
    layers (nn.Linear, Conv1D) and of embeddings (plain, or scaled by ``embed_scale``), unless a module that
    cannot compute with a compact weight shares it (then it stays fp32 for all of them)."""
    targets: dict[int, bool] = {}
    kept: set[int] = set()
    for module in model.modules():
        for name, weight in module.named_parameters(recurse=False):
            if weight.requires_grad:
                continue  # LoRA's own layers train
            kind = _kind(module) if name == "weight" else None
            if kind is None:
                kept.add(id(weight))
            else:
                targets[id(weight)] = kind == "conv1d"
    return {weight: transposed for weight, transposed in targets.items() if weight not in kept}


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, Conv1D):
        return "conv1d"
    if isinstance(module, nn.Linear):
        return "linear"
    plain = type(module).forward is nn.Embedding.forward or hasattr(module, "embed_scale")
    if isinstance(module, nn.Embedding) and plain and module.max_norm is None:
        return "embedding"
    return None


def compact_model(model: nn.Module, dtype: str) -> dict[int, WeightOrigin]:
    """Replace the modules of model's ``compact_targets`` by their compact form, in place; a weight shared by
    two modules (tied embedding and head) stays shared. Meta weights give meta compact tensors (a skeleton
    that a slice fills), real ones are quantized. Returns the origin of each compact tensor by id. fp32
    changes nothing."""
    check_base_dtype(dtype)
    origins: dict[int, WeightOrigin] = {}
    if dtype == "fp32":
        return origins
    targets = compact_targets(model)
    made: dict[int, dict[str, torch.Tensor]] = {}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            weight = child._parameters.get("weight")  # its own: a LoRA wrapper's .weight is its base layer's
            if weight is not None and id(weight) in targets and _kind(child) is not None:
                setattr(parent, name, _compact(child, dtype, targets[id(weight)], made, origins))
    return origins


def _compact(module: nn.Module, dtype: str, transposed: bool, made: dict, origins: dict) -> nn.Module:
    weight = module.weight
    rows, columns = weight.shape[::-1] if transposed else weight.shape
    if id(weight) not in made:
        if weight.is_meta:
            tensors = {n: torch.empty(shape, dtype=dt, device="meta")
                       for n, (shape, dt) in compact_layout(rows, columns, dtype).items()}
        else:
            tensors = quantize(weight.T if transposed else weight, dtype)
        made[id(weight)] = tensors
        origins.update({id(t): WeightOrigin(weight, n, transposed) for n, t in tensors.items()})
    tensors = made[id(weight)]
    if isinstance(module, nn.Embedding):
        return CompactEmbedding(rows, columns, dtype, tensors, getattr(module, "embed_scale", None))
    return CompactLinear(columns, rows, dtype, tensors, module.bias)


def dequantized(weight: torch.Tensor, dtype: str) -> torch.Tensor:
    """The fp32 values a compact weight [rows, columns] computes with (tests compare against plain fp32)."""
    if dtype == "fp32":
        return weight.detach().to(torch.float32)
    return CompactWeight(dtype, quantize(weight, dtype), weight.shape[1]).dequantize()
