"""An ExecuTorch stage program vs the eager reference runner, and the runner's refusals.

Lowering costs ~30 s a block, so this module exports one stage: the "full" role over one block of
tiny-gemma3 (whose tied embedding and LM head then sit in one program, with a scaled embedding, a
sliding-window block, q/k norms and soft-capped logits), the role the 3-device rings of
tests/integration/test_train_executorch.py do not run. Those rings cover head, middle and tail on
LLaMA and GPT-2, and export determinism.
"""
from __future__ import annotations

import shutil
import sys

import pytest
import torch

pytest.importorskip("executorch")
pytestmark = pytest.mark.slow

from edge_runtime.backends.executorch.export import export_executorch_stage
from edge_runtime.backends.executorch.runner import (
    ExecuTorchNotInstalledError,
    ExecuTorchStageRunner,
)
from edge_runtime.backends.torch.runner import TorchStageRunner
from edge_runtime.models.lora import LoraSpec, apply_lora
from edge_runtime.models.registry import load_model
from edge_runtime.models.stage import build_stage
from ringtune.manifest import ExportManifest, ManifestError
from ringtune.optimizer_spec import OptimizerSpec
from ringtune.plan import StageSpec
from ringtune.run_shape import RunShape

MODEL = "tiny-gemma3"
SHAPE = RunShape(micro_batch_size=2, seq_len=16)  # longer than tiny-gemma3's window (8)
LORA = LoraSpec(r=4, alpha=8, seed=3)
# Embedding + one block + norm + LM head + loss: every part of a model in one program pair.
FULL = StageSpec("dev", (0, 1), "full")
TOLERANCE = 1e-4


def lora_model(eager_attention: bool):
    """The model with LoRA, B initialised non-zero so every LoRA tensor gets a gradient at once."""
    model = load_model(MODEL)
    if eager_attention:
        model.set_attn_implementation("eager")
    peft_model = apply_lora(model, LORA)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return peft_model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    stage = export_executorch_stage(*build_stage(lora_model(eager_attention=True), FULL.layers, FULL.role), FULL, 0,
                                    SHAPE, out)
    ExportManifest(MODEL, "executorch", SHAPE.micro_batch_size, SHAPE.seq_len, LORA.to_dict(), {}, (stage,)).write(out)
    return out


def batches(count: int):
    """Deterministic (input_ids, labels) per micro-batch."""
    generator = torch.Generator().manual_seed(11)
    for _ in range(count):
        input_ids = torch.randint(0, 256, (SHAPE.micro_batch_size, SHAPE.seq_len), generator=generator)
        labels = torch.randint(0, 256, (SHAPE.micro_batch_size, SHAPE.seq_len), generator=generator)
        labels[0, -3:] = -100  # padding is ignored by the loss
        yield input_ids, labels


def test_matches_torch_runner(exported):
    module, lora = build_stage(lora_model(eager_attention=False), FULL.layers, FULL.role)  # torch's default
    reference = TorchStageRunner(module, lora, OptimizerSpec())
    runner = ExecuTorchStageRunner(exported, 0, OptimizerSpec())
    assert runner.lora_state().keys() == reference.lora_state().keys()
    data = list(batches(count=2))
    step_tokens = sum(int((labels[:, 1:] != -100).sum()) for _, labels in data)
    for _ in range(3):
        for microbatch, (input_ids, labels) in enumerate(data):
            expected = reference.forward(microbatch, input_ids, labels, step_tokens)
            actual = runner.forward(microbatch, input_ids, labels, step_tokens)
            torch.testing.assert_close(actual, expected, atol=TOLERANCE, rtol=0)
            actual_dx, expected_dx = runner.backward(microbatch, None), reference.backward(microbatch, None)
            assert actual_dx is None and expected_dx is None  # the first stage sends no gradient back
        for name, p in lora.items():
            torch.testing.assert_close(runner._lora[name].grad, p.grad, atol=TOLERANCE, rtol=0, msg=name)
        reference.step()
        runner.step()
    expected_state, actual_state = reference.lora_state(), runner.lora_state()
    for name in expected_state:
        torch.testing.assert_close(actual_state[name], expected_state[name], atol=TOLERANCE, rtol=0, msg=name)


def test_corrupt_program_is_refused(exported, tmp_path):
    copy = shutil.copytree(exported, tmp_path / "export")
    program = copy / "stage0" / "vjp.pte"
    data = bytearray(program.read_bytes())
    data[len(data) // 2] ^= 0xFF
    program.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=r"stage 0: file .*stage0/vjp\.pte is corrupt"):
        ExecuTorchStageRunner(copy, 0, OptimizerSpec())


def test_wrong_input_shape_is_refused(exported):
    runner = ExecuTorchStageRunner(exported, 0, OptimizerSpec())
    input_ids = torch.zeros(3, SHAPE.seq_len, dtype=torch.long)
    with pytest.raises(ValueError, match=r"stage 0 \(full\): input_ids has shape \[3, 16\] .* \[2, 16\]"):
        runner.forward(0, input_ids, input_ids, 10)


def test_missing_executorch_says_how_to_install(exported, monkeypatch):
    monkeypatch.setitem(sys.modules, "executorch.runtime", None)  # makes the import fail
    with pytest.raises(ExecuTorchNotInstalledError, match=r"stage 0 .*pip install 'ringtune\[executorch\]'"):
        ExecuTorchStageRunner(exported, 0, OptimizerSpec())
