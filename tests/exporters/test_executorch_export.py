"""ExecuTorch stage programs vs the eager reference runner, and the runner's refusals."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("executorch")

from edge_runtime.models.lora import LoraSpec, apply_lora
from edge_runtime.models.registry import load_model
from edge_runtime.models.stage import build_stage
from edge_runtime.runners.base import OptimizerSpec
from edge_runtime.runners.executorch_runner import (
    ExecuTorchNotInstalledError,
    ExecuTorchStageRunner,
)
from edge_runtime.runners.torch_runner import TorchStageRunner
from exporters.executorch_export import export_executorch_stage
from exporters.manifest import ExportManifest, ManifestError, RunShape
from ringtune.plan import StageSpec

SHAPE = RunShape(micro_batch_size=2, seq_len=16)
LORA = LoraSpec(r=4, alpha=8, seed=3)
# One block per stage keeps the export (~30 s a stage here) affordable; "full" over one block runs
# the same embedding + blocks + norm + head + loss program as over all of them.
ROLES = {"head": (0, 1), "middle": (1, 2), "tail": (3, 4), "full": (0, 1)}
ARCHS = ("tiny-llama", "tiny-gpt2")
TOLERANCE = 1e-4


def lora_model(arch: str, eager_attention: bool):
    """The model with LoRA, B initialised non-zero so every LoRA tensor gets a gradient at once."""
    model = load_model(arch)
    if eager_attention:
        model.set_attn_implementation("eager")
    peft_model = apply_lora(model, LORA)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return peft_model


def export_one(peft_model, arch: str, role: str, out: Path) -> Path:
    stage = export_executorch_stage(peft_model, StageSpec("dev", ROLES[role], role), 0, SHAPE, out)
    ExportManifest(arch, "executorch", SHAPE.micro_batch_size, SHAPE.seq_len, LORA.to_dict(), {}, (stage,)).write(out)
    return out


@pytest.fixture(scope="module", params=[(a, r) for a in ARCHS for r in ROLES], ids=lambda p: f"{p[0]}-{p[1]}")
def exported(request, tmp_path_factory) -> tuple[str, str, Path]:
    arch, role = request.param
    out = tmp_path_factory.mktemp(f"{arch}-{role}")
    return arch, role, export_one(lora_model(arch, eager_attention=True), arch, role, out)


def batches(arch: str, role: str, count: int):
    """Deterministic (inputs, labels, grad_output) per micro-batch for the stage's role."""
    generator = torch.Generator().manual_seed(11)
    b, t = SHAPE.micro_batch_size, SHAPE.seq_len
    d = load_model(arch).config.hidden_size
    for _ in range(count):
        if role in ("head", "full"):
            inputs = torch.randint(0, 256, (b, t), generator=generator)
        else:
            inputs = torch.randn(b, t, d, generator=generator)
        labels = torch.randint(0, 256, (b, t), generator=generator)
        labels[0, -3:] = -100  # padding is ignored by the loss
        grad_output = torch.randn(b, t, d, generator=generator) if role in ("head", "middle") else None
        yield inputs, labels, grad_output


def test_matches_torch_runner(exported):
    arch, role, out = exported
    reference_model = lora_model(arch, eager_attention=False)  # the torch runtime's default attention
    module, lora = build_stage(reference_model, ROLES[role], role)
    reference = TorchStageRunner(module, lora, OptimizerSpec())
    runner = ExecuTorchStageRunner(out, 0, OptimizerSpec())
    assert runner.lora_state().keys() == reference.lora_state().keys()
    data = list(batches(arch, role, count=2))
    step_tokens = sum(int((labels[:, 1:] != -100).sum()) for _, labels, _ in data)
    for _ in range(3):
        for microbatch, (inputs, labels, grad_output) in enumerate(data):
            expected = reference.forward(microbatch, inputs, labels, step_tokens)
            actual = runner.forward(microbatch, inputs, labels, step_tokens)
            torch.testing.assert_close(actual, expected, atol=TOLERANCE, rtol=0)
            expected_dx = reference.backward(microbatch, grad_output)
            actual_dx = runner.backward(microbatch, grad_output)
            if role in ("head", "full"):
                assert actual_dx is None and expected_dx is None
            else:
                torch.testing.assert_close(actual_dx, expected_dx, atol=TOLERANCE, rtol=0)
        for name, p in lora.items():
            torch.testing.assert_close(runner._lora[name].grad, p.grad, atol=TOLERANCE, rtol=0, msg=name)
        reference.step()
        runner.step()
    expected_state, actual_state = reference.lora_state(), runner.lora_state()
    for name in expected_state:
        torch.testing.assert_close(actual_state[name], expected_state[name], atol=TOLERANCE, rtol=0, msg=name)


@pytest.fixture(scope="module")
def gpt2_tail(tmp_path_factory) -> Path:
    return export_one(lora_model("tiny-gpt2", True), "tiny-gpt2", "tail", tmp_path_factory.mktemp("gpt2-tail"))


def test_corrupt_program_is_refused(gpt2_tail, tmp_path):
    copy = shutil.copytree(gpt2_tail, tmp_path / "export")
    program = copy / "stage0" / "vjp.pte"
    data = bytearray(program.read_bytes())
    data[len(data) // 2] ^= 0xFF
    program.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=r"stage 0: file .*stage0/vjp\.pte is corrupt"):
        ExecuTorchStageRunner(copy, 0, OptimizerSpec())


def test_wrong_input_shape_is_refused(gpt2_tail):
    runner = ExecuTorchStageRunner(gpt2_tail, 0, OptimizerSpec())
    hidden = torch.zeros(3, SHAPE.seq_len, 64)
    with pytest.raises(ValueError, match=r"stage 0 \(tail\): hidden has shape \[3, 16, 64\] .* \[2, 16, 64\]"):
        runner.forward(0, hidden, torch.zeros(3, SHAPE.seq_len, dtype=torch.long), 10)


def test_missing_executorch_says_how_to_install(gpt2_tail, monkeypatch):
    monkeypatch.setitem(sys.modules, "executorch.runtime", None)  # makes the import fail
    with pytest.raises(ExecuTorchNotInstalledError, match=r"stage 0 .*pip install 'ringtune\[executorch\]'"):
        ExecuTorchStageRunner(gpt2_tail, 0, OptimizerSpec())


def test_export_is_deterministic(gpt2_tail, tmp_path):
    again = export_one(lora_model("tiny-gpt2", True), "tiny-gpt2", "tail", tmp_path)
    for name in ("manifest.json", "stage0/forward.pte", "stage0/vjp.pte", "stage0/lora.safetensors"):
        assert (again / name).read_bytes() == (gpt2_tail / name).read_bytes(), name
