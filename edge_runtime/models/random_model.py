"""A Hugging Face model directory with seeded random weights, written one tensor at a time.

Fixtures for tests and benchmarks that need a model of a real size without a model hub: a 1B-class
LLaMA is 4.4 GB in fp32, and nothing here ever holds it whole (the skeleton is built on the meta
device; each tensor is drawn, written and dropped). The tokenizer is byte-level (the 256 bytes and an
end-of-text token), so any text encodes; the config's vocabulary may be larger, as in a real model
(those rows are never looked up but cost their memory).
"""
from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedConfig, PreTrainedTokenizerFast

from edge_runtime.models.safetensors_stream import TensorLayout, write_safetensors

END_OF_TEXT = "<|endoftext|>"
BYTE_TOKENS = 256


def write_random_model(config: PreTrainedConfig, path: Path, seed: int = 0) -> Path:
    """Write config.json, model.safetensors and a byte-level tokenizer to path (once: an existing
    directory is kept). Weights: N(0, initializer_range) matrices, ones for norm scales, zero biases,
    each drawn from its own generator seeded by (seed, tensor index), so the bytes depend on nothing else."""
    if (path / "config.json").is_file():
        return path
    if config.vocab_size <= BYTE_TOKENS:
        raise ValueError(f"the vocabulary must hold the {BYTE_TOKENS} bytes and end-of-text, not {config.vocab_size}")
    config.eos_token_id = config.pad_token_id = config.bos_token_id = BYTE_TOKENS
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    params = dict(skeleton.named_parameters())  # a tied LM head appears once, as the embedding
    layout = [TensorLayout(name, tuple(p.shape), torch.float32) for name, p in params.items()]
    index = {name: i for i, name in enumerate(params)}
    std = getattr(config, "initializer_range", 0.02)

    def produce(entry: TensorLayout) -> torch.Tensor:
        if entry.name.endswith("bias"):
            return torch.zeros(entry.shape)
        if len(entry.shape) == 1:
            return torch.ones(entry.shape)  # norm scales
        generator = torch.Generator().manual_seed(seed * 1_000_003 + index[entry.name])
        return torch.randn(entry.shape, generator=generator) * std

    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_safetensors(tmp / "model.safetensors", layout, produce, {"format": "pt"})
    config.save_pretrained(tmp)
    byte_tokenizer().save_pretrained(tmp)
    os.replace(tmp, path)
    return path


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with no merges: token i < 256 is one byte, 256 is end of text (also padding)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(alphabet)} | {END_OF_TEXT: BYTE_TOKENS}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=END_OF_TEXT, pad_token=END_OF_TEXT,
                                   bos_token=END_OF_TEXT)
