"""`ringtune train --runtime executorch`: real agents running ExecuTorch programs the coordinator
exported and shipped, against what torch trains; mixed rings; export determinism; refusals of bad
programs and shapes.

Lowering costs ~30 s of one core a program, and a model has one program pair per block structure
whatever its depth and plan, so each architecture here lowers two programs (one export cache
serves the whole module): tiny-llama runs all on ExecuTorch, then mixed on the cached programs;
tiny-gpt2 runs mixed with node2 on torch. The plan gives the owner's head and tail a block each,
so programs run in the head, middle and tail roles. Gemma-3's two structures and the "full" role
are tests/edge_runtime/backends/executorch/test_export.py's.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from coordinator.stage_exports import PROGRAM_ENTRY, program_key
from edge_runtime.data.dataset import OwnerData, read_records
from edge_runtime.models.lora import LoraSpec, adapter_key, apply_lora
from edge_runtime.models.registry import load_config, load_model, load_tokenizer
from edge_runtime.backends.executorch.export import write_block_program
from ringtune.optimizer_spec import OptimizerSpec
from ringtune.run_shape import RunShape
from helpers import TOKEN, AgentProcess, ringtune_command, write_text_data
from reference import max_difference, reference_adapter

pytest.importorskip("executorch")
pytestmark = pytest.mark.slow

TOLERANCE = 1e-4
STEPS, MICRO_BATCHES = 3, 4
SHAPE = RunShape(micro_batch_size=2, seq_len=24)
LORA = LoraSpec(r=4, alpha=8, seed=11)
OPTIMIZER = OptimizerSpec(lr=0.01)
# Per architecture: the runtimes of owner, node1, node2 in the ring checked against torch training.
EXECUTORCH_RUNTIMES = {"tiny-llama": "executorch", "tiny-gpt2": "executorch,executorch,torch"}
# Gemma-3's programs are checked by tests/edge_runtime/backends/executorch/test_export.py (the "full" role).
ARCHITECTURES = list(EXECUTORCH_RUNTIMES)


def run_args(seq_len: int = SHAPE.seq_len) -> list[str]:
    return ["--steps", str(STEPS), "--micro-batches", str(MICRO_BATCHES), "--micro-batch-size",
            str(SHAPE.micro_batch_size), "--seq-len", str(seq_len), "--lr", str(OPTIMIZER.lr), "--lora-r", str(LORA.r),
            "--lora-alpha", str(LORA.alpha), "--seed", str(LORA.seed)]


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
    """A block for every stage: the owner's head and tail run programs too."""
    stages = [{"device": "owner", "layers": [0, 1], "role": "head"},
              {"device": "node1", "layers": [1, 2], "role": "middle"},
              {"device": "node2", "layers": [2, 3], "role": "middle"},
              {"device": "owner", "layers": [3, 4], "role": "tail"}]
    path = directory / f"plan-{model}.json"
    path.write_text(json.dumps({"model": model, "owner": "owner", "micro_batches": 4, "stages": stages}))
    return str(path)


def local_ring(model: str, runtimes: str, data, out) -> dict:
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
    return {arch: torch_adapter(arch, data) for arch in ARCHITECTURES}


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
    assert "lowered the programs of block structures [0]" in ring["stdout"]
    assert "with ExecuTorch programs" in ring["stdout"]
    assert max_difference(ring["adapter"], torch_adapters[arch]) < TOLERANCE
    assert max_difference(torch_adapters[arch], initial_adapter(arch)) > 1e-3, "training changed nothing"


def initial_adapter(arch: str):
    """The untrained adapter (initial LoRA tensors), to show the runs moved the weights."""
    model = apply_lora(load_model(arch), LORA)
    return {adapter_key(n): p.detach() for n, p in model.named_parameters() if p.requires_grad}


def test_mixed_ring_reuses_the_cached_programs(executorch_rings, torch_adapters, data, tmp_path):
    """Owner on ExecuTorch, node1 on torch, node2 on ExecuTorch: same adapter, nothing re-exported."""
    out = tmp_path / "run"
    model = "tiny-llama"
    result = train("--model", model, "--local", "3", "--runtime", "executorch,torch,executorch",
                   "--data", str(data), "--plan", plan_file(model, tmp_path), "--out", str(out), *run_args())
    assert result.returncode == 0, result.stderr
    assert "found in the export cache" in result.stdout and "lowered the programs" not in result.stdout
    mixed = load_file(out / "adapter_model.safetensors")
    assert max_difference(mixed, torch_adapters["tiny-llama"]) < TOLERANCE


def test_executorch_agents_are_calibrated_through_their_programs(executorch_rings, data, tmp_path):
    """Planned, not given a plan: the coordinator sends the (cached) programs first, then every agent times a block
    in its own runtime, so the planner weighs ExecuTorch agents by their programs and learns the owner's scored
    share from an ExecuTorch owner too."""
    result = train("--model", "tiny-llama", "--local", "3", "--runtime", "executorch,torch,executorch",
                   "--data", str(data), "--out", str(tmp_path / "run"), *run_args())
    assert result.returncode == 0, result.stderr
    found = result.stdout.index("ExecuTorch programs found in the export cache")
    timed = result.stdout.index("one block forward + backward (fp32 weights): ")
    assert found < timed
    timed_line = result.stdout[timed:].splitlines()[0]
    assert all(f"{name} " in timed_line for name in ("owner", "node1", "node2")), timed_line
    assert "of the positions are scored" in result.stdout


def test_export_is_deterministic(executorch_rings, tmp_path, isolated_state):
    """The forward program lowered again, in this process, has the bytes of the ring's export (lowered in
    a worker process and cached)."""
    config = load_config("tiny-llama").to_dict()
    cached = isolated_state / "cache" / "exports" / program_key(config, 0, SHAPE, LORA)
    assert (cached / PROGRAM_ENTRY).is_file()
    write_block_program(config, LORA, 0, 0, SHAPE, tmp_path, "forward")
    assert (tmp_path / "block0" / "forward.pte").read_bytes() == (cached / "block0" / "forward.pte").read_bytes()


def test_local_export_dir_is_checked_against_the_run(executorch_rings, data, tmp_path, isolated_state):
    """node1 runs a local export directory: a run of another shape, then a corrupted program, are
    refused with the stage and the file named, and the agent stays ready."""
    model = "tiny-llama"
    shipped = next(d for d in (isolated_state / "state" / "exports").iterdir()
                   if json.loads((d / "manifest.json").read_text())["model"] == model)
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
        assert f"{export_dir}/manifest.json were exported for" in wrong_shape.stderr
        assert "2 x 24 tokens but this run uses 2 x 32" in wrong_shape.stderr, wrong_shape.stderr
        program = export_dir / "block0" / "backward.pte"
        corrupt = bytearray(program.read_bytes())
        corrupt[len(corrupt) // 2] ^= 0xFF
        program.write_bytes(bytes(corrupt))
        corrupted = train(*ring, "--out", str(tmp_path / "b"), *run_args())
        assert corrupted.returncode == 2
        assert "block structure 0 (blocks [0, 1, 2, 3]): file" in corrupted.stderr, corrupted.stderr
        assert "block0/backward.pte is corrupt" in corrupted.stderr, corrupted.stderr
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
