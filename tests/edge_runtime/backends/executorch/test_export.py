"""ExecuTorch block programs vs the eager reference runner, and the runner's refusals.

Lowering costs ~30 s of one core a program, so this module lowers one model: tiny-gemma3, whose two
block structures (sliding and full attention) give two program pairs, run over all four blocks of a
"full" stage (scaled embedding, q/k norms, a tied head with soft-capped logits in eager torch). The
3-device rings of tests/integration/test_train_executorch.py run LLaMA and GPT-2 programs in the
head, middle and tail roles. Block splitting itself (no lowering) is test_block_split.py's.
"""
from __future__ import annotations

import shutil
import sys

import pytest
import torch

pytest.importorskip("executorch")
pytestmark = pytest.mark.slow

from edge_runtime.calibration import block_seconds
from edge_runtime.models.lora import LoraSpec, apply_lora
from edge_runtime.models.registry import load_config, load_model
from edge_runtime.models.stage import build_stage
from edge_runtime.backends.executorch.runner import (
    ExecuTorchNotInstalledError,
    ExecuTorchStageRunner,
    load_block_programs,
)
from edge_runtime.backends.torch.runner import TorchStageRunner
from exporters.export import export_manifest, export_programs
from ringtune.manifest import ManifestError
from ringtune.optimizer_spec import OptimizerSpec
from ringtune.run_shape import RunShape

MODEL = "tiny-gemma3"
SHAPE = RunShape(micro_batch_size=2, seq_len=16)  # longer than tiny-gemma3's window (8)
LORA = LoraSpec(r=4, alpha=8, seed=3)
TOLERANCE = 1e-4


def lora_model():
    """The model with LoRA, B initialised non-zero so every LoRA tensor gets a gradient at once."""
    peft_model = apply_lora(load_model(MODEL), LORA)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return peft_model


def full_stage():
    model = lora_model()
    return build_stage(model, (0, model.config.num_hidden_layers), "full")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("programs")
    programs = export_programs(MODEL, out, SHAPE, LORA, workers=2)
    export_manifest(MODEL, "executorch", SHAPE, LORA, (), programs).write(out)
    return out


def batches(count: int):
    """Deterministic (input_ids, labels) per micro-batch."""
    generator = torch.Generator().manual_seed(11)
    for _ in range(count):
        input_ids = torch.randint(0, 256, (SHAPE.micro_batch_size, SHAPE.seq_len), generator=generator)
        labels = torch.randint(0, 256, (SHAPE.micro_batch_size, SHAPE.seq_len), generator=generator)
        labels[0, -3:] = -100  # padding is ignored by the loss
        yield input_ids, labels


def test_one_program_pair_per_block_structure(exported):
    programs = load_block_programs(exported, threads=1)
    assert sorted(p.entry.blocks for p in programs.loaded.values()) == [(0, 2), (1, 3)]  # sliding, full
    sizes = [(exported / path).stat().st_size for p in programs.loaded.values() for path in p.entry.files.values()]
    weights = sum(p.numel() * 4 for p in load_model(MODEL).model.layers[0].parameters())
    assert max(sizes) < weights, "the programs hold no weights"


def test_matches_torch_runner(exported):
    module, lora = full_stage()
    reference = TorchStageRunner(module, lora, OptimizerSpec())
    runner = ExecuTorchStageRunner(*full_stage(), load_block_programs(exported, threads=1), OptimizerSpec())
    assert runner.lora_state().keys() == reference.lora_state().keys()
    data = list(batches(count=2))
    step_tokens = sum(int((labels[:, 1:] != -100).sum()) for _, labels in data)
    for _ in range(3):
        for microbatch, (input_ids, labels) in enumerate(data):
            expected = reference.forward(microbatch, input_ids, labels, step_tokens)
            actual = runner.forward(microbatch, input_ids, labels, step_tokens)
            torch.testing.assert_close(actual, expected, atol=TOLERANCE, rtol=0)
        for microbatch in range(len(data)):  # both in flight, as a pipeline keeps them
            assert runner.backward(microbatch, None) is None and reference.backward(microbatch, None) is None
        for name, p in lora.items():
            torch.testing.assert_close(runner._lora[name].grad, p.grad, atol=TOLERANCE, rtol=0, msg=name)
        reference.step()
        runner.step()
    expected_state, actual_state = reference.lora_state(), runner.lora_state()
    for name in expected_state:
        torch.testing.assert_close(actual_state[name], expected_state[name], atol=TOLERANCE, rtol=0, msg=name)


def test_corrupt_program_is_refused(exported, tmp_path):
    copy = shutil.copytree(exported, tmp_path / "export")
    program = copy / "block1" / "backward.pte"
    data = bytearray(program.read_bytes())
    data[len(data) // 2] ^= 0xFF
    program.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=r"block structure 1 \(blocks \[1, 3\]\): file .*block1/backward\.pte "
                                            r"is corrupt"):
        load_block_programs(copy)


def test_missing_executorch_says_how_to_install(exported, monkeypatch):
    monkeypatch.setitem(sys.modules, "executorch.runtime", None)  # makes the import fail
    with pytest.raises(ExecuTorchNotInstalledError, match=r"pip install 'ringtune\[executorch\]'"):
        load_block_programs(exported)


def test_wrong_input_shape_is_refused(exported):
    runner = ExecuTorchStageRunner(*full_stage(), load_block_programs(exported, threads=1), OptimizerSpec())
    input_ids = torch.zeros(3, SHAPE.seq_len, dtype=torch.long)
    with pytest.raises(ValueError, match=r"blocks \[0, 4\] \(full\): the input has shape \[3, 16\] .* 2 x 16 tokens"):
        runner.forward(0, input_ids, input_ids, 10)


def test_calibration_times_the_programs_of_this_run(exported):
    """An ExecuTorch agent's block time for the planner comes from the programs it will run, checked like its stages."""
    config = load_config(MODEL).to_dict()
    seconds = block_seconds(config, LORA, SHAPE.micro_batch_size, SHAPE.seq_len, export_dir=exported,
                            min_seconds=0.05, windows=1)
    assert 0 < seconds < 5
    with pytest.raises(ManifestError, match=r"exported for micro-batches of 2 x 16 tokens but this run uses 1 x 16"):
        block_seconds(config, LORA, 1, SHAPE.seq_len, export_dir=exported, min_seconds=0.05, windows=1)
