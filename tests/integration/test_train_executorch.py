"""`ringtune train --runtime executorch`: real agents running ExecuTorch programs the coordinator
exported and shipped, against the torch runtime; mixed rings; refusals of bad programs and shapes.

Lowering costs ~30 s a block here, so the models are the 2-block tiny variants on a plan that
gives each helper one block and leaves the owner the embedding and the head (the fewest blocks a
3-device ring takes), and one export cache serves the whole module.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from helpers import ARCHITECTURES, TOKEN, AgentProcess, ringtune_command, write_text_data
from reference import max_difference

pytest.importorskip("executorch")
pytestmark = pytest.mark.slow

TOLERANCE = 1e-4


def run_args(seq_len: int = 24) -> list[str]:
    return ["--steps", "3", "--micro-batches", "4", "--micro-batch-size", "2", "--seq-len", str(seq_len),
            "--lr", "0.01", "--lora-r", "4", "--lora-alpha", "8", "--seed", "11"]


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


def local_ring(arch: str, runtime: str, data, out) -> dict:
    model = two_blocks(arch)
    result = train("--model", model, "--local", "3", "--runtime", runtime, "--data", str(data),
                   "--plan", plan_file(model, out.parent), "--out", str(out), *run_args())
    assert result.returncode == 0, result.stderr
    assert "step 3/3" in result.stdout
    return {"adapter": load_file(out / "adapter_model.safetensors"), "stdout": result.stdout}


@pytest.fixture(scope="module")
def rings(tmp_path_factory, data):
    """Per architecture: the torch ring (reference) and the all-ExecuTorch ring (exports the stages)."""
    return {arch: {runtime: local_ring(arch, runtime, data, tmp_path_factory.mktemp(f"{arch}-{runtime}") / "run")
                   for runtime in ("torch", "executorch")}
            for arch in ARCHITECTURES}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_executorch_ring_matches_torch_ring(arch, rings):
    torch_ring, executorch_ring = rings[arch]["torch"], rings[arch]["executorch"]
    assert "exported stages [" in executorch_ring["stdout"]
    assert "of ExecuTorch programs" in executorch_ring["stdout"]
    assert max_difference(executorch_ring["adapter"], torch_ring["adapter"]) < TOLERANCE
    assert max_difference(torch_ring["adapter"], initial_adapter(arch)) > 1e-3, "training changed nothing"


def initial_adapter(arch: str):
    """The untrained adapter (initial LoRA tensors), to show the runs moved the weights."""
    from edge_runtime.models.lora import LoraSpec, adapter_key, apply_lora
    from edge_runtime.models.registry import load_model

    model = apply_lora(load_model(two_blocks(arch)), LoraSpec(4, 8, seed=11))
    return {adapter_key(n): p.detach() for n, p in model.named_parameters() if p.requires_grad}


def test_mixed_ring_reuses_the_cached_stages(rings, data, tmp_path):
    """Owner on ExecuTorch, node1 on torch, node2 on ExecuTorch: same adapter, nothing re-exported."""
    out = tmp_path / "run"
    model = two_blocks("tiny-llama")
    result = train("--model", model, "--local", "3", "--runtime", "executorch,torch,executorch",
                   "--data", str(data), "--plan", plan_file(model, tmp_path), "--out", str(out), *run_args())
    assert result.returncode == 0, result.stderr
    assert "found in the export cache" in result.stdout and "exported stages" not in result.stdout
    mixed = load_file(out / "adapter_model.safetensors")
    assert max_difference(mixed, rings["tiny-llama"]["torch"]["adapter"]) < TOLERANCE


def test_local_export_dir_is_checked_against_the_run(rings, data, tmp_path, isolated_state):
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
