"""`ringtune train --runtime executorch`: real agents running ExecuTorch programs the coordinator
exported and shipped, against what torch trains; mixed rings; export determinism; refusals of bad
programs and shapes.

Lowering costs ~30 s a block here, so the models are the 2-block tiny variants on a plan that
gives each helper one block and leaves the owner the embedding (head) and the norm + LM head
(tail), the fewest blocks a 3-device ring takes, and one export cache serves the whole module:
tiny-llama-2l runs all on ExecuTorch, then mixed on the cached stages; tiny-gpt2-2l runs mixed
with only node2 on torch, which exports head, middle and tail but one block. The "full" role is
tests/edge_runtime/backends/executorch/test_export.py's.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from coordinator.stage_exports import STAGE_MANIFEST, stage_key
from edge_runtime.data.dataset import OwnerData, read_records
from edge_runtime.models.lora import LoraSpec, adapter_key, apply_lora
from edge_runtime.models.registry import load_model, load_tokenizer
from exporters.export import export_stages
from ringtune.manifest import StageManifest
from ringtune.optimizer_spec import OptimizerSpec
from helpers import TOKEN, AgentProcess, ringtune_command, write_text_data
from reference import max_difference, reference_adapter
from ringtune.plan import Plan
from ringtune.run_shape import RunShape

pytest.importorskip("executorch")
pytestmark = pytest.mark.slow

TOLERANCE = 1e-4
STEPS, MICRO_BATCHES = 3, 4
SHAPE = RunShape(micro_batch_size=2, seq_len=24)
LORA = LoraSpec(r=4, alpha=8, seed=11)
OPTIMIZER = OptimizerSpec(lr=0.01)
# Per architecture: the runtimes of owner, node1, node2 in the ring checked against torch training.
EXECUTORCH_RUNTIMES = {"tiny-llama": "executorch", "tiny-gpt2": "executorch,executorch,torch"}
# Gemma-3's programs are checked by tests/edge_runtime/backends/executorch/test_export.py (the "full" role): a
# ring of it here would lower three more stages.
ARCHITECTURES = list(EXECUTORCH_RUNTIMES)


def run_args(seq_len: int = SHAPE.seq_len) -> list[str]:
    return ["--steps", str(STEPS), "--micro-batches", str(MICRO_BATCHES), "--micro-batch-size",
            str(SHAPE.micro_batch_size), "--seq-len", str(seq_len), "--lr", str(OPTIMIZER.lr), "--lora-r", str(LORA.r),
            "--lora-alpha", str(LORA.alpha), "--seed", str(LORA.seed)]


def two_blocks(arch: str) -> str:
    return f"{arch}-2l"


def train(*args, timeout=900):
    return subprocess.run(ringtune_command("train", *args), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module", autouse=True)
def isolated_state(tmp_path_factory):
    """One export cache and agent state for the module (agents inherit the environment)."""
    root = tmp_path_factory.mktemp("ringtune-home")
    saved = {key: os.environ.get(key) for key in ("RINGTUNE_CACHE", "RINGTUNE_STATE")}
    os.environ.update(RINGTUNE_CACHE=str(root / "cache"), RINGTUNE_STATE=str(root / "state"))
    yield root
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_text_data(tmp_path_factory.mktemp("data") / "train.jsonl", records=40)


def plan_file(model: str, directory) -> str:
    """The owner keeps the embedding (head) and norm + LM head + loss (tail), each helper a block."""
    stages = [{"device": "owner", "layers": [0, 0], "role": "head"},
              {"device": "node1", "layers": [0, 1], "role": "middle"},
              {"device": "node2", "layers": [1, 2], "role": "middle"},
              {"device": "owner", "layers": [2, 2], "role": "tail"}]
    path = directory / f"plan-{model}.json"
    path.write_text(json.dumps({"model": model, "owner": "owner", "micro_batches": 4, "stages": stages}))
    return str(path)


def local_ring(arch: str, runtimes: str, data, out) -> dict:
    model = two_blocks(arch)
    result = train("--model", model, "--local", "3", "--runtime", runtimes, "--data", str(data),
                   "--plan", plan_file(model, out.parent), "--out", str(out), *run_args())
    assert result.returncode == 0, result.stderr
    assert f"step {STEPS}/{STEPS}" in result.stdout
    return {"adapter": load_file(out / "adapter_model.safetensors"), "stdout": result.stdout}


@pytest.fixture(scope="module")
def torch_adapters(data):
    """Per architecture, the adapter a torch ring trains with these settings, computed in this
    process by plain peft: tests/integration/test_train_cli.py holds torch rings to it within 1e-5
    (same settings), so running a torch ring here would only add its four processes."""
    return {arch: torch_adapter(two_blocks(arch), data) for arch in ARCHITECTURES}


def torch_adapter(model: str, data):
    owner_data = OwnerData(read_records(data), load_tokenizer(model), SHAPE.micro_batch_size, SHAPE.seq_len,
                           MICRO_BATCHES, seed=LORA.seed)
    return reference_adapter(model, LORA, OPTIMIZER, owner_data, STEPS)


@pytest.fixture(scope="module")
def executorch_rings(tmp_path_factory, data):
    """Per architecture, the ring on EXECUTORCH_RUNTIMES (it exports the stages into the cache)."""
    return {arch: local_ring(arch, EXECUTORCH_RUNTIMES[arch], data, tmp_path_factory.mktemp(arch) / "run")
            for arch in ARCHITECTURES}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_executorch_ring_matches_torch(arch, executorch_rings, torch_adapters):
    ring = executorch_rings[arch]
    assert "exported stages [" in ring["stdout"]
    assert "of ExecuTorch programs" in ring["stdout"]
    assert max_difference(ring["adapter"], torch_adapters[arch]) < TOLERANCE
    assert max_difference(torch_adapters[arch], initial_adapter(arch)) > 1e-3, "training changed nothing"


def initial_adapter(arch: str):
    """The untrained adapter (initial LoRA tensors), to show the runs moved the weights."""
    model = apply_lora(load_model(two_blocks(arch)), LORA)
    return {adapter_key(n): p.detach() for n, p in model.named_parameters() if p.requires_grad}


def test_mixed_ring_reuses_the_cached_stages(executorch_rings, torch_adapters, data, tmp_path):
    """Owner on ExecuTorch, node1 on torch, node2 on ExecuTorch: same adapter, nothing re-exported."""
    out = tmp_path / "run"
    model = two_blocks("tiny-llama")
    result = train("--model", model, "--local", "3", "--runtime", "executorch,torch,executorch",
                   "--data", str(data), "--plan", plan_file(model, tmp_path), "--out", str(out), *run_args())
    assert result.returncode == 0, result.stderr
    assert "found in the export cache" in result.stdout and "exported stages" not in result.stdout
    mixed = load_file(out / "adapter_model.safetensors")
    assert max_difference(mixed, torch_adapters["tiny-llama"]) < TOLERANCE


def test_export_is_deterministic(executorch_rings, tmp_path, isolated_state):
    """The owner's tail (the smallest stage with both programs) exported again, in this process,
    has the bytes of the ring's export, lowered in a worker process and cached."""
    model = two_blocks("tiny-llama")
    plan = Plan.from_dict(json.loads(Path(plan_file(model, tmp_path)).read_text()))
    tail = len(plan.stages) - 1
    cached = isolated_state / "cache" / "exports" / stage_key(model, plan, tail, SHAPE, LORA)
    (stage,) = export_stages(model, plan, [tail], tmp_path / "again", "executorch", SHAPE, LORA)
    assert stage == StageManifest.from_dict(json.loads((cached / STAGE_MANIFEST).read_text()))
    for relative in stage.files.values():
        assert (tmp_path / "again" / relative).read_bytes() == (cached / relative).read_bytes(), relative


def test_local_export_dir_is_checked_against_the_run(executorch_rings, data, tmp_path, isolated_state):
    """node1 runs a local export directory: a run of another shape, then a corrupted program, are
    refused with the stage and the file named, and the agent stays ready."""
    model = two_blocks("tiny-llama")
    shipped = next(d for d in (isolated_state / "state" / "exports").iterdir()
                   if json.loads((d / "manifest.json").read_text())["stages"][0]["index"] == 1
                   and json.loads((d / "manifest.json").read_text())["model"] == model)
    export_dir = shutil.copytree(shipped, tmp_path / "node1-export")  # copies, not the cache's links
    agents = []
    try:
        agents = [AgentProcess("owner", tmp_path / "owner", data=data),
                  AgentProcess("node1", tmp_path / "node1", extra=("--runtime", "executorch",
                                                                   "--export-dir", str(export_dir))),
                  AgentProcess("node2", tmp_path / "node2")]
        ring = ["--agents", ",".join(a.url for a in agents), "--owner", "owner", "--token", TOKEN,
                "--model", model, "--plan", plan_file(model, tmp_path)]
        wrong_shape = train(*ring, "--out", str(tmp_path / "a"), *run_args(seq_len=32))
        assert wrong_shape.returncode == 2
        assert "stage 1:" in wrong_shape.stderr and "stage1/forward.pte" in wrong_shape.stderr
        assert "2 x 24 tokens but this run uses 2 x 32" in wrong_shape.stderr, wrong_shape.stderr
        program = export_dir / "stage1" / "vjp.pte"
        corrupt = bytearray(program.read_bytes())
        corrupt[len(corrupt) // 2] ^= 0xFF
        program.write_bytes(bytes(corrupt))
        corrupted = train(*ring, "--out", str(tmp_path / "b"), *run_args())
        assert corrupted.returncode == 2
        assert "stage 1: file" in corrupted.stderr and "stage1/vjp.pte is corrupt" in corrupted.stderr, \
            corrupted.stderr
        assert "Traceback" not in wrong_shape.stderr + corrupted.stderr
        assert all(agent.alive() for agent in agents)
    finally:
        for agent in agents:
            agent.stop()


def test_agent_without_executorch_says_how_to_install(tmp_path):
    """A device where executorch cannot be imported (blocked in sys.modules) refuses at start."""
    shim = ("import sys; sys.modules['executorch'] = None; from ringtune.cli import main; "
            "sys.argv[0] = 'ringtune'; sys.exit(main())")
    result = subprocess.run([sys.executable, "-c", shim, "agent", "--name", "phone", "--runtime", "executorch",
                             "--no-advertise", "--listen", "tcp://127.0.0.1:0", "--token", TOKEN,
                             "--state-dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "ringtune agent: error: --runtime executorch needs the ExecuTorch runtime" in result.stderr
    assert "pip install 'ringtune[executorch]'" in result.stderr and "Traceback" not in result.stderr
