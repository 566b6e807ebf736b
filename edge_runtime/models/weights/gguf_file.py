"""Convert a LLaMA-family GGUF file to a Hugging Face safetensors directory, one tensor at a time.

The ``gguf`` package reads each tensor (Q4/Q8 blocks included) and dequantizes it to fp32; the tensor is
renamed to its Hugging Face name (gguf-py's name table, as transformers' GGUF loader uses), q/k
projections get llama.cpp's head permutation undone, and the tensor is written before the next one is
read. Config and tokenizer come from the file's metadata (transformers reads them without tensors).
The weights equal what ``AutoModelForCausalLM.from_pretrained(..., gguf_file=...)`` gives, without
building the whole fp32 model first.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import torch

from edge_runtime.models.safetensors_stream import TensorLayout, write_safetensors

SUPPORTED_ARCHITECTURES = ("llama",)


class UnsupportedGGUFError(ValueError):
    """A GGUF file of an architecture ringtune cannot convert."""


def gguf_architecture(reader) -> str:
    """``general.architecture`` of an opened ``gguf.GGUFReader``."""
    field = reader.fields.get("general.architecture")
    return str(field.contents()) if field is not None else "unknown"


def convert_gguf(path: Path, target: Path) -> None:
    """Write config.json, model.safetensors (fp32) and the tokenizer for the GGUF file at path into target."""
    from gguf import MODEL_ARCH, GGUFReader, get_tensor_name_map
    from transformers import AutoConfig, AutoTokenizer

    path = Path(path)
    reader = GGUFReader(path)
    architecture = gguf_architecture(reader)
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedGGUFError(
            f"{path.name}: GGUF architecture {architecture!r} is not supported; ringtune converts LLaMA-family "
            f"GGUF files ({', '.join(SUPPORTED_ARCHITECTURES)}): give a Hugging Face safetensors directory instead")
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    model = _meta_model(config)
    names = _hf_names(model, get_tensor_name_map(MODEL_ARCH.LLAMA, config.num_hidden_layers))
    config.architectures = [type(model).__name__]  # as save_pretrained writes it: tools pick the class by it
    tensors = {t.name: t for t in reader.tensors if t.name in names}
    layout = [TensorLayout(names[name], tuple(int(n) for n in reversed(t.shape)), torch.float32)
              for name, t in tensors.items()]
    by_hf_name = {names[name]: t for name, t in tensors.items()}
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_safetensors(tmp / "model.safetensors", layout,
                      lambda entry: _hf_tensor(by_hf_name[entry.name], entry, config), {"format": "pt"})
    config.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(tmp)
    os.replace(tmp, target)


def _meta_model(config) -> torch.nn.Module:
    """The causal LM for config, without memory behind its weights."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def _hf_names(model: torch.nn.Module, name_map) -> dict[str, str]:
    """GGUF tensor name -> Hugging Face state-dict name, for every tensor of the model."""
    names = {}
    for hf_name in model.state_dict():
        stem, _, suffix = hf_name.rpartition(".")
        gguf_name = name_map.get_name(stem)
        if gguf_name is not None:
            names[f"{gguf_name}.{suffix}"] = hf_name
    return names


def _hf_tensor(tensor, entry: TensorLayout, config) -> torch.Tensor:
    from gguf.quants import dequantize

    weights = dequantize(tensor.data, tensor.tensor_type).reshape(entry.shape)  # fp32
    if ".attn_q." in tensor.name:
        weights = _unpermute(weights, config.num_attention_heads)
    elif ".attn_k." in tensor.name:
        weights = _unpermute(weights, config.num_key_value_heads)
    return torch.from_numpy(np.array(weights, dtype=np.float32))  # a writable copy


def _unpermute(weights: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's rotary layout of q/k rows (convert_hf_to_gguf's permute): per head, the two
    interleaved halves go back to the first and second half."""
    half = weights.shape[0] // heads // 2
    return weights.reshape(heads, half, 2, *weights.shape[1:]).swapaxes(2, 1).reshape(weights.shape)
