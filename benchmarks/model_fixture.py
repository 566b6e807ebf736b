"""Write a LLaMA-shaped model with seeded random weights as a Hugging Face safetensors directory, one tensor
at a time (a 1B-class model never exists in memory here either), with SmolLM2's tokenizer.

    python benchmarks/model_fixture.py --size 0.3b --out /tmp/llama-0.3b

The same (size, seed) writes the same bytes; an existing complete directory is kept. Shards of at most
--shard-gb with a ``model.safetensors.index.json``, as large checkpoints come.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZES = {
    # hidden, layers, heads, kv heads, intermediate: fp32 bytes with SmolLM2's 49152-token vocabulary, untied head
    "0.3b": dict(hidden_size=1024, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=8,
                 intermediate_size=2816),  # 290M parameters, 1.16 GB
    "1b": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
               intermediate_size=5632),  # TinyLlama-1.1B's blocks: 1.1B parameters, 4.4 GB
}
VOCAB = 49152


def config_for(size: str):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, max_position_embeddings=2048, tie_word_embeddings=False,
                       rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=2, **SIZES[size])


def write_fixture(size: str, out: Path, seed: int = 0, shard_gb: float = 2.0) -> Path:
    """The model directory (written unless it is complete already)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edge_runtime.models.registry import model_dir
    from edge_runtime.models.safetensors_stream import TensorLayout, write_safetensors

    out = Path(out)
    if (out / "config.json").is_file():
        return out
    config = config_for(size)
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in AutoModelForCausalLM.from_config(config).state_dict().items()}
    shards, current, total = [], [], 0
    for name, shape in shapes.items():
        layout = TensorLayout(name, shape, torch.float32)
        if current and total + layout.nbytes > shard_gb * 1e9:
            shards.append(current)
            current, total = [], 0
        current.append(layout)
        total += layout.nbytes
    shards.append(current)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weight_map = {}
    for index, layouts in enumerate(shards):
        file = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(tmp / file, layouts, lambda entry: _random(entry, seed), {"format": "pt"})
        weight_map.update({entry.name: file for entry in layouts})
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(model_dir("smollm2-135m")).save_pretrained(tmp)
    tmp.rename(out)
    return out


def _random(entry, seed: int):
    """Norms 1, everything else N(0, 0.02), from a generator seeded by (seed, tensor name)."""
    import torch

    if entry.name.endswith("norm.weight"):
        return torch.ones(entry.shape)
    key = int.from_bytes(hashlib.sha256(f"{seed}/{entry.name}".encode()).digest()[:8], "little")
    return torch.empty(entry.shape).normal_(0.0, 0.02, generator=torch.Generator().manual_seed(key))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="0.3b")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-gb", type=float, default=2.0)
    args = parser.parse_args()
    print(write_fixture(args.size, args.out, args.seed, args.shard_gb))
    return 0


if __name__ == "__main__":
    sys.exit(main())
