"""An agent busy with work keeps answering heartbeats: a 500 MB slice uploaded to and loaded by an agent
limited to 0.3 of a core (cgroup v1 CPU quota, as an emulated Raspberry Pi gets), with the coordinator's
status heartbeat timed throughout."""
import shutil
import time
import uuid

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from coordinator.client import AgentClient
from cluster import cgroups
from edge_runtime.models.lora import LoraSpec
from edge_runtime.models.slices import cut_slice, skeleton
from edge_runtime.models.weights.in_memory import InMemoryWeights
from ringtune import protocol
from ringtune.optimizer_spec import OptimizerSpec
from ringtune.plan import Plan, StageSpec
from ringtune.privacy_spec import PrivacySpec
from ringtune.security import new_key, wrap_key

from helpers import TOKEN, AgentProcess

pytestmark = [pytest.mark.slow, pytest.mark.root]
HEARTBEAT = 5.0
CORES = 0.3
LORA = LoraSpec(r=2, alpha=4)
# 12 blocks of 12.8 M parameters; the helper gets 10 of them: a 514 MB fp32 slice
CONFIG = LlamaConfig(vocab_size=256, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                     num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=64,
                     tie_word_embeddings=False)
PLAN = Plan("big-llama", "owner", (StageSpec("owner", (0, 1), "head"), StageSpec("slow", (1, 11)),
                                   StageSpec("owner", (11, 12), "tail")), micro_batches=1)


@pytest.fixture
def slow_agent(tmp_path):
    if not cgroups.available():
        pytest.skip("needs root and cgroup v1 (cpu, memory) to cap the agent's CPU")
    group = cgroups.Cgroup(f"ringtune-hb{uuid.uuid4().hex[:6]}-slow")
    group.create(CORES, 4 << 30)
    join = " ".join(f"echo $$ > {path}/cgroup.procs;" for path in group.paths)
    agent = AgentProcess("slow", tmp_path / "slow", prefix=("sh", "-c", f'{join} exec "$@"', "sh"))
    yield agent
    agent.stop()
    group.remove()
    shutil.rmtree(tmp_path / "slow" / "cache", ignore_errors=True)  # the 500 MB slice; the log stays


def middle_slice(path) -> str:
    """Write the helper's slice to path; its sha256."""
    torch.manual_seed(0)
    weights = InMemoryWeights(AutoModelForCausalLM.from_config(CONFIG).state_dict(), "the test's model")
    return cut_slice(weights, skeleton(CONFIG, LORA, initial_lora=True), {1: PLAN.stages[1]}, path)


def timed_status(client: AgentClient, latencies: list[float]) -> protocol.StatusReply:
    started = time.monotonic()
    status = client.request(protocol.Status())  # AgentUnreachable after HEARTBEAT seconds: the test fails
    latencies.append(time.monotonic() - started)
    return status


def test_an_agent_on_a_third_of_a_core_answers_heartbeats_while_it_takes_and_loads_a_500_mb_slice(slow_agent, tmp_path):
    digest = middle_slice(tmp_path / "slice.safetensors")
    blob = (tmp_path / "slice.safetensors").read_bytes()
    (tmp_path / "slice.safetensors").unlink()  # held in memory from here on; a full run keeps every tmp_path
    assert len(blob) > 500e6
    client = AgentClient(slow_agent.url, protocol.Timeouts(heartbeat=HEARTBEAT))
    client.pair(TOKEN, "heartbeat-run")
    upload_latencies, load_latencies = [], []
    for offset in range(0, len(blob), protocol.CHUNK_BYTES):  # the last chunk's timeout scales with the blob
        client.request(protocol.Upload(sha256=digest, offset=offset, total=len(blob),
                                       data=blob[offset:offset + protocol.CHUNK_BYTES]))
        timed_status(client, upload_latencies)
    started = time.monotonic()
    client.request(protocol.Assign(
        run="heartbeat-run", lineage="0123456789abcdef", plan=PLAN, config=CONFIG.to_dict(),
        hidden_size=CONFIG.hidden_size, lora=LORA, optimizer=OptimizerSpec(), micro_batch_size=1, seq_len=16,
        seed=0, run_key=wrap_key(client.session_key, new_key()), timeout=30.0, encrypt=False,
        privacy=PrivacySpec(), slice=digest))
    while (status := timed_status(client, load_latencies)).state == "loading":
        time.sleep(0.2)
    loading = time.monotonic() - started
    assert status.state == "ready", status.error
    print(f"\n{len(blob) / 1e6:.0f} MB slice at {CORES} cores: loaded in {loading:.1f} s; status answered in at most "
          f"{max(upload_latencies):.2f} s while uploading, {max(load_latencies):.2f} s while loading "
          f"({len(load_latencies)} heartbeats)")
    assert loading > 2 * max(load_latencies), "the load was too short to show anything"
    client.request(protocol.Stop())
    client.close()
