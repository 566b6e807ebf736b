"""The exact partitioner: ring order, devices used and block ranges that minimize the step time.

Cost model (design.md, "Planner and step time"). Stage s costs a_s = t_s + c_s per micro-batch:
t_s its forward + backward compute (FLOPs / sustained GFLOP/s), c_s sending its output hidden
state and receiving the gradient back over the slower of its two links (0 on the tail). A stage
that does not train (the owner withholds gradients, RunShape.privacy: every stage before its tail)
costs its forward alone (CostTable.block_flops) and receives no gradient. The owner runs the head
and the tail on the same cores, so its busy time per micro-batch is a_head + a_tail; a middle
device's busy time is its a_s. One optimizer step takes

    sum_s a_s  +  (M - 1) * max over devices of busy time

(pipeline fill and drain, then the steady-state bottleneck). With forward-only stages the ring is a
forward pipeline into the training tail, and the same holds: the first micro-batch's forwards and
the tail's forward + backward, then one micro-batch per bottleneck busy time. Memory per device is
``coordinator.planning.memory``'s model of an agent's peak (its runtime, weights, LoRA + AdamW,
the activations its stages keep in flight: 1F1B S - s micro-batches on stage s of S, GPipe all M;
none, and no LoRA gradients or AdamW, on a forward-only stage; workspace and frame buffers),
evaluated on whole block-range matrices with the same formula and the same arguments
(MemoryModel.stage's trains and runs_ahead) that check a finished plan (plan_memory).

Search, exact. Devices with equal RAM, GFLOP/s and link are interchangeable, so a chain of middle
stages is a multiset of device types ("state"). A DP runs over (state, first type, first block)
for every right end of the chain at once (min-plus matrix products with numpy); position from the
end is the state's size, which fixes each stage's in-flight count, and the first type fixes the
link to the previous stage. The owner's head and tail close the chain. The objective mixes a sum
and a max, so the DP minimizes the sum under a cap on every busy time: starting uncapped, each
round's optimum has some peak busy time, and the next round only allows busy times strictly below
it. The optimal plan's peak lies between two consecutive caps, where the round's optimum has a sum
no larger and a peak no larger, so the best plan seen over the rounds is optimal. Later rounds
have larger sums, so a plan better than the best so far needs a peak below (best - sum) / (M - 1):
the cap also drops to that bound, and the rounds stop when it falls to the smallest peak any plan
can reach (one min-max DP) or when nothing fits under the cap.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import get_args

import numpy as np

from coordinator.planning.costs import CostTable
from coordinator.planning.memory import (DoesNotFitError, Footprint, MemoryModel, describe, gb, in_flight,
                                         plan_memory)
from ringtune.run_shape import RunShape
from device_profiles.profile import DeviceProfile
from ringtune.plan import PLANNED_SCHEDULES, Plan, PlanError, Role, StageSpec, validate_plan

INF = float("inf")
ROLES: tuple[Role, ...] = get_args(Role)
__all__ = ["DoesNotFitError", "partition"]


@dataclass(frozen=True, slots=True)
class _Costs:
    """The run's costs as prefix sums over blocks, per micro-batch (seconds need a device's speed)."""
    num_blocks: int
    """L."""
    memory: MemoryModel
    """Memory terms (prefix sums and range matrices over blocks)."""
    trains: dict[Role, bool]
    """Whether a stage of each role trains (RunShape.privacy: under withheld gradients only the tail and a
    one-stage run's full stage); the others run forward only."""
    runs_ahead: bool
    """A split ring has a forward-only stage, which sends every micro-batch at once (MemoryModel.stage)."""
    flops: dict[Role, np.ndarray]
    """[L + 1] prefix sums, by role, of the FLOPs per micro-batch of a stage's blocks: forward + backward, or
    forward only in a stage that does not train (with dequantization's, CostTable.block_flops)."""
    link_bytes: dict[Role, float]
    """Bytes one cut sends per micro-batch, by the role of the stage before it: the encoded hidden state
    forward, and its gradient back when that stage trains."""
    head_flops: dict[Role, float]
    """FLOPs per micro-batch of the embedding end, in a head or a full stage."""
    tail_flops: dict[Role, float]
    """FLOPs per micro-batch of the norm + LM head + loss end (the head and loss on scored positions), in a
    tail or a full stage."""


def _costs(table: CostTable, shape: RunShape) -> _Costs:
    tokens = shape.tokens
    trains = {role: shape.privacy.trains(role) for role in ROLES}
    return _Costs(
        num_blocks=table.num_blocks,
        memory=MemoryModel(table, shape),
        trains=trains,
        runs_ahead=not all(trains[role] for role in ("head", "middle", "tail")),
        flops={role: np.concatenate([[0.0], np.cumsum(table.block_flops(tokens, trains[role]))]) for role in ROLES},
        link_bytes={role: _cut_bytes(table, shape, trains[role]) for role in ("head", "middle")},
        head_flops={role: table.end_flops(table.head_end, tokens, trains[role]) for role in ("head", "full")},
        tail_flops={role: table.end_flops(table.tail_end, tokens, trains[role])
                    + table.end_flops(table.scored_end, tokens * shape.scored_share, trains[role])
                    for role in ("tail", "full")})


def _cut_bytes(table: CostTable, shape: RunShape, sender_trains: bool) -> float:
    """Bytes a cut carries per micro-batch: the hidden state forward, and its gradient back to a sender that trains."""
    kinds = ("activation", "gradient") if sender_trains else ("activation",)
    return shape.tokens * sum(shape.wire.bytes_per_token(kind, table.hidden_size) for kind in kinds)


def _in_flight(shape: RunShape, stages_to_end: int) -> int:
    """Micro-batches a stage keeps activations for; stages_to_end = S - s (1 on the tail). The count
    depends on nothing else, so it is stage 0's of a ring of stages_to_end stages."""
    return in_flight(shape.schedule, stages_to_end, 0, shape.micro_batches)


def _footprint(costs: _Costs, shape: RunShape, start, end, role: Role, stages_to_end: int) -> Footprint:
    """plan_memory's footprint of a stage of this role (on [start, end) matrices): forward only if it does not
    train, every frame waiting on a split ring with a forward-only stage."""
    return costs.memory.stage(start, end, role, _in_flight(shape, stages_to_end), costs.trains[role],
                              costs.runs_ahead and role != "full")


def _link_seconds(costs: _Costs, sender: DeviceProfile, receiver: DeviceProfile, role: Role) -> float:
    """Hidden state forward (plus its gradient back if the sending stage, of this role, trains), over the
    slower of the two links."""
    return costs.link_bytes[role] / min(sender.link_bytes_per_s, receiver.link_bytes_per_s)


@dataclass(frozen=True, slots=True)
class _Search:
    """Everything the DP rounds share: devices grouped into types, and per-stage cost matrices."""
    costs: _Costs
    """The run's costs."""
    shape: RunShape
    """The run's shape."""
    owner: DeviceProfile
    """The device that runs the head and the tail."""
    types: tuple[DeviceProfile, ...]
    """One representative profile per group of interchangeable non-owner devices."""
    counts: tuple[int, ...]
    """Devices in each group."""
    head_seconds: np.ndarray
    """[L + 1] owner compute of the head stage ending at block h."""
    tail_seconds: np.ndarray
    """[L + 1] owner compute of the tail stage starting at block t."""
    full_seconds: float
    """Owner compute of the whole model alone."""
    stage_matrices: dict
    """(type, next type or -1 for the owner, stages to the tail) -> [b, e] busy seconds, inf if it
    does not fit in memory or e <= b."""


def _type_key(device: DeviceProfile) -> tuple:
    """Devices with the same key are interchangeable in every cost."""
    return device.ram_bytes, device.baseline_bytes, device.gflops, device.link_bytes_per_s


def _device_types(devices: list[DeviceProfile]) -> tuple[tuple[DeviceProfile, ...], tuple[int, ...]]:
    groups: dict[tuple, list[DeviceProfile]] = {}
    for device in devices:
        groups.setdefault(_type_key(device), []).append(device)
    return tuple(g[0] for g in groups.values()), tuple(len(g) for g in groups.values())


def _stage_matrix(costs: _Costs, shape: RunShape, device: DeviceProfile, receiver: DeviceProfile,
                  stages_to_end: int) -> np.ndarray:
    f = costs.flops["middle"]
    seconds = (f[None, :] - f[:, None]) / (device.gflops * 1e9) + _link_seconds(costs, device, receiver, "middle")
    blocks = np.arange(costs.num_blocks + 1)
    start, end = blocks[:, None], blocks[None, :]
    stage = _footprint(costs, shape, start, end, "middle", stages_to_end)
    memory = costs.memory.device(device.baseline_bytes, [stage]).total  # [b, e]
    usable = (end > start) & (memory <= device.ram_bytes)
    return np.where(usable, seconds, INF)


def _search(costs: _Costs, shape: RunShape, owner: DeviceProfile, others: list[DeviceProfile]) -> _Search:
    types, counts = _device_types(others)
    head, tail, full, speed = costs.flops["head"], costs.flops["tail"], costs.flops["full"], owner.gflops * 1e9
    matrices = {}
    for stages_to_end in range(2, sum(counts) + 2):
        for k, device in enumerate(types):
            for k2, receiver in [(-1, owner), *enumerate(types)]:
                matrices[k, k2, stages_to_end] = _stage_matrix(costs, shape, device, receiver, stages_to_end)
    return _Search(costs, shape, owner, types, counts,
                   head_seconds=(costs.head_flops["head"] + head) / speed,
                   tail_seconds=(tail[-1] - tail + costs.tail_flops["tail"]) / speed,
                   full_seconds=float((costs.head_flops["full"] + full[-1] + costs.tail_flops["full"]) / speed),
                   stage_matrices=matrices)


def _owner_footprint(search: _Search, num_stages: int) -> Footprint:
    """[h, t] owner footprint with head [0, h) and tail [t, L) in a ring of num_stages stages."""
    costs, shape, L = search.costs, search.shape, search.costs.num_blocks
    blocks = np.arange(L + 1)
    head = _footprint(costs, shape, 0, blocks[:, None], "head", num_stages)
    tail = _footprint(costs, shape, blocks[None, :], L, "tail", 1)
    return costs.memory.device(search.owner.baseline_bytes, [head, tail])


def _owner_memory(search: _Search, num_stages: int) -> np.ndarray:
    """[h, t] owner bytes with head [0, h) and tail [t, L) in a ring of num_stages stages."""
    return np.broadcast_to(_owner_footprint(search, num_stages).total, (search.costs.num_blocks + 1,) * 2)


@dataclass(frozen=True, slots=True)
class _Candidate:
    """A multi-stage plan as the DP sees it."""
    value: float
    """The DP's objective: sum of stage costs (sum rounds) or peak busy time (min-max round)."""
    head_end: int
    """h: the head stage is [0, h)."""
    tail_start: int
    """t: the tail stage is [t, L)."""
    middles: tuple[tuple[int, int, int], ...]
    """(type, start, end) of each middle stage in ring order."""


def _best_chain(search: _Search, cap: float, combine) -> _Candidate | None:
    """Best multi-stage plan whose busy times are all < cap; combine is np.add (sum) or np.maximum."""
    counts = search.counts
    states = sorted(itertools.product(*(range(n + 1) for n in counts)), key=sum)[1:]
    table: dict[tuple, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # (state, k) -> value[t, b], e, k2
    for state in states:
        for k in (k for k in range(len(counts)) if state[k]):
            table[state, k] = _extend(search, table, state, k, cap, combine)
    return _close_ring(search, table, cap, combine) if table else None


def _capped(matrix: np.ndarray, cap: float) -> np.ndarray:
    return np.where(matrix < cap, matrix, INF)


def _extend(search: _Search, table: dict, state: tuple, k: int, cap: float, combine):
    """Chains with device multiset `state` whose first stage is on type k: value[t, b] covering
    [b, t), the end e of the first stage and the type k2 of the second (-1: none)."""
    size = sum(state)
    rest = tuple(n - (i == k) for i, n in enumerate(state))
    if not sum(rest):
        only = _capped(search.stage_matrices[k, -1, 2], cap).T  # [t, b]
        return only, np.broadcast_to(np.arange(only.shape[0])[:, None], only.shape), np.full(only.shape, -1)
    best = best_e = best_k2 = None
    for k2 in (k2 for k2 in range(len(rest)) if rest[k2]):
        first = _capped(search.stage_matrices[k, k2, size + 1], cap)  # [b, e]
        following = table[rest, k2][0]  # [t, e]
        candidates = combine(following[:, None, :], first[None, :, :])  # [t, b, e]
        e = candidates.argmin(axis=2)
        value = np.take_along_axis(candidates, e[..., None], axis=2)[..., 0]
        if best is None:
            best, best_e, best_k2 = value, e, np.full(value.shape, k2)
        else:
            better = value < best
            best = np.where(better, value, best)
            best_e = np.where(better, e, best_e)
            best_k2 = np.where(better, k2, best_k2)
    return best, best_e, best_k2


def _close_ring(search: _Search, table: dict, cap: float, combine) -> _Candidate | None:
    """Add the owner's head [0, h) before and tail [t, L) after every chain; keep the best."""
    L, K = search.costs.num_blocks, search.shape.min_owner_blocks
    blocks = np.arange(L + 1)
    ends_ok = (blocks[:, None] >= K) & (blocks[None, :] <= L - K)  # [h, t]
    best: _Candidate | None = None
    for (state, k), (value, _, _) in table.items():
        link = _link_seconds(search.costs, search.owner, search.types[k], "head")
        busy = (search.head_seconds + link)[:, None] + search.tail_seconds[None, :]  # [h, t]
        fits = _owner_memory(search, sum(state) + 2) <= search.owner.ram_bytes
        total = np.where(ends_ok & fits & (busy < cap), combine(busy, value.T), INF)
        h, t = np.unravel_index(total.argmin(), total.shape)
        if total[h, t] < INF and (best is None or total[h, t] < best.value):
            best = _Candidate(float(total[h, t]), int(h), int(t), _walk(table, state, k, int(h), int(t)))
    return best


def _walk(table: dict, state: tuple, k: int, start: int, end: int) -> tuple[tuple[int, int, int], ...]:
    """The middle stages of the best chain for (state, k) covering [start, end)."""
    stages = []
    while True:
        _, next_end, next_type = table[state, k]
        e, k2 = int(next_end[end, start]), int(next_type[end, start])
        stages.append((k, start, e))
        if k2 < 0:
            return tuple(stages)
        state = tuple(n - (i == k) for i, n in enumerate(state))
        start, k = e, k2


def _busy_times(search: _Search, candidate: _Candidate) -> tuple[list[float], float]:
    """Busy seconds per stage (head, middles..., tail) from the same matrices the DP used, and the peak."""
    middles = candidate.middles
    receivers = [m[0] for m in middles[1:]] + [-1]
    stage_busy = [float(search.stage_matrices[k, k2, len(middles) - i + 1][b, e])
                  for i, ((k, b, e), k2) in enumerate(zip(middles, receivers))]
    head = search.head_seconds[candidate.head_end] + _link_seconds(search.costs, search.owner,
                                                                   search.types[middles[0][0]], "head")
    tail = search.tail_seconds[candidate.tail_start]
    owner_busy = head + tail
    return [float(head), *stage_busy, float(tail)], float(max([owner_busy, *stage_busy]))


def _step_seconds(stage_busy: list[float], peak: float, micro_batches: int) -> float:
    return sum(stage_busy) + (micro_batches - 1) * peak


def partition(table: CostTable, profiles: list[DeviceProfile], owner: str, shape: RunShape) -> Plan:
    """The plan with the smallest predicted step time that fits every device's memory.

    Raises DoesNotFitError when no plan fits, PlanError on inconsistent input.
    """
    _check_input(table, profiles, owner, shape)
    costs = _costs(table, shape)
    by_name = {p.name: p for p in profiles}
    others = [p for p in profiles if p.name != owner]
    search = _search(costs, shape, by_name[owner], others)
    best = _best_split(search)
    full = _full_plan_seconds(search)
    if full is not None and (best is None or full <= best[0]):
        return _full_plan(table, search, full)
    if best is None:
        raise DoesNotFitError(_does_not_fit_message(table, search, others))
    return _split_plan(table, search, best[1], others)


def _best_split(search: _Search) -> tuple[float, _Candidate] | None:
    """(step seconds, candidate) of the fastest plan with at least one middle stage."""
    if not search.types:
        return None
    floor = _best_chain(search, INF, np.maximum)  # the smallest peak any split can reach
    if floor is None:
        return None
    weight = search.shape.micro_batches - 1
    # Seed the incumbent with the best plan at the smallest peak: with many micro-batches it is
    # close to optimal, which makes the cap below drop fast.
    best = _scored(search, _best_chain(search, np.nextafter(floor.value, INF), np.add))
    cap = INF
    while (round_best := _best_chain(search, cap, np.add)) is not None:
        best = min(best, _scored(search, round_best), key=lambda scored: scored[0])
        if weight == 0:
            break
        # Later rounds have sums >= this one, so a better plan needs a peak below this bound.
        bound = (best[0] - round_best.value) / weight
        if bound <= floor.value:
            break
        cap = min(_busy_times(search, round_best)[1], bound)
    return best


def _scored(search: _Search, candidate: _Candidate) -> tuple[float, _Candidate]:
    stage_busy, peak = _busy_times(search, candidate)
    return _step_seconds(stage_busy, peak, search.shape.micro_batches), candidate


def _full_plan_seconds(search: _Search) -> float | None:
    """Step seconds of the owner alone, or None if the whole model does not fit on it."""
    if _full_memory(search) > search.owner.ram_bytes:
        return None
    return search.full_seconds * search.shape.micro_batches


def _full_plan(table: CostTable, search: _Search, step: float) -> Plan:
    L, owner = table.num_blocks, search.owner.name
    stages = (StageSpec(owner, (0, L), "full"),)
    return _plan(table, search, stages, step, owner, [search.full_seconds], [0.0])


def _full_footprint(search: _Search) -> Footprint:
    costs = search.costs
    return costs.memory.device(search.owner.baseline_bytes,
                               [_footprint(costs, search.shape, 0, costs.num_blocks, "full", 1)])


def _full_memory(search: _Search) -> float:
    return float(_full_footprint(search).total)


def _split_plan(table: CostTable, search: _Search, best: _Candidate, others: list[DeviceProfile]) -> Plan:
    owner = search.owner
    pools = {k: [p for p in others if _type_key(p) == _type_key(t)] for k, t in enumerate(search.types)}
    devices = [pools[k].pop(0) for k, _, _ in best.middles]
    stages = (StageSpec(owner.name, (0, best.head_end), "head"),
              *(StageSpec(d.name, (b, e), "middle") for d, (_, b, e) in zip(devices, best.middles)),
              StageSpec(owner.name, (best.tail_start, table.num_blocks), "tail"))
    stage_busy, peak = _busy_times(search, best)
    ring = [owner, *devices, owner]
    roles = ["head", *["middle"] * len(devices)]
    links = [_link_seconds(search.costs, a, b, role) for a, b, role in zip(ring, ring[1:], roles)] + [0.0]
    owner_busy = stage_busy[0] + stage_busy[-1]
    busiest = max([(owner_busy, owner.name), *zip(stage_busy[1:-1], (d.name for d in devices))])[1]
    step = _step_seconds(stage_busy, peak, search.shape.micro_batches)
    compute = [s - l for s, l in zip(stage_busy, links)]
    return _plan(table, search, stages, step, busiest, compute, links, devices)


def _plan(table: CostTable, search: _Search, stages: tuple[StageSpec, ...], step: float, bottleneck: str,
          compute: list[float], links: list[float], devices: list[DeviceProfile] = ()) -> Plan:
    """The plan, its predictions, and each device's memory from the one model that checks any plan."""
    shape = search.shape
    plan = Plan(table.model, search.owner.name, stages, shape.schedule, shape.micro_batches,
                privacy=shape.privacy.public_dict())
    validate_plan(plan, table.num_blocks)
    baselines = {d.name: d.baseline_bytes for d in [search.owner, *devices]}
    ram = {d.name: d.ram_bytes for d in [search.owner, *devices]}
    memory = plan_memory(table, shape, plan, baselines, ram)
    assert all(f.total <= ram[name] for name, f in memory.items()), "the search kept a plan that does not fit"
    predicted = {
        "step_seconds": step,
        "tokens_per_second": shape.tokens * shape.micro_batches / step if step > 0 else INF,
        "bottleneck": bottleneck,
        "stage_compute_seconds": compute,
        "stage_link_seconds": links,
        "memory_bytes": {name: int(f.total) for name, f in memory.items()},
        "memory": {name: f.to_dict() for name, f in memory.items()},
        "micro_batch_size": shape.micro_batch_size,
        "seq_len": shape.seq_len,
    }
    return replace(plan, predicted=predicted)


def _check_input(table: CostTable, profiles: list[DeviceProfile], owner: str, shape: RunShape) -> None:
    names = [p.name for p in profiles]
    if len(set(names)) != len(names):
        raise PlanError(f"device names must be unique, got {names}: name them with --device PROFILE:NAME")
    if owner not in names:
        raise PlanError(f"the owner {owner!r} is not among the devices {names}")
    if min(shape.micro_batch_size, shape.seq_len, shape.micro_batches) < 1 or shape.min_owner_blocks < 0:
        raise PlanError("micro-batch size, sequence length and micro-batches must be >= 1, "
                        "min owner blocks >= 0")
    if not 0 < shape.scored_share <= 1:
        raise PlanError(f"the share of scored positions must be in (0, 1], got {shape.scored_share}")
    if shape.schedule not in PLANNED_SCHEDULES:
        raise PlanError(f"unknown schedule {shape.schedule!r}: use one of {', '.join(PLANNED_SCHEDULES)}")
    if shape.seq_len != table.seq_len:
        raise PlanError(f"the cost table was traced at sequence length {table.seq_len}, the run uses "
                        f"{shape.seq_len}: build the table with seq_len={shape.seq_len}")


def _does_not_fit_message(table: CostTable, search: _Search, others: list[DeviceProfile]) -> str:
    """Why nothing fits: the devices that run out, bytes needed against available, what would help."""
    shape, owner = search.shape, search.owner
    devices = [owner, *others]
    available = sum(d.ram_bytes for d in devices)
    # Every byte the model needs at least once (one micro-batch in flight; none kept for a backward when a split
    # may run its blocks forward only), plus every device's runtime and heap slack: a device that is left out
    # takes its RAM away with them, which are smaller.
    costs = search.costs
    least = costs.memory.stage(0, costs.num_blocks, "full", _in_flight(shape, 1), not (others and costs.runs_ahead))
    whole = costs.memory.device(sum(d.baseline_bytes for d in devices), [least])
    whole = replace(whole, heap=whole.heap * len(devices))
    fix = (f"add devices, or lower --micro-batch-size (now {shape.micro_batch_size}) or --seq-len "
           f"(now {shape.seq_len})" + (", or use --schedule 1f1b" if shape.schedule == "gpipe" else ""))
    listing = ", ".join(f"{d.name} {gb(d.ram_bytes, 1)}" for d in devices)
    if whole.running > available:
        return (f"{table.model} does not fit: it needs at least {gb(whole.running, 1)} ({describe(whole)}) but the "
                f"devices have {gb(available, 1)} together ({listing}); {fix} (about "
                f"{gb(whole.running - available, 1)} more is needed)")
    K, L = shape.min_owner_blocks, search.costs.num_blocks
    owner_least = _full_memory(search) if not others or 2 * K >= L else _owner_memory(search, 3)[K, L - K]
    if owner_least > owner.ram_bytes:
        return (f"the owner {owner.name} runs out of memory: it needs at least {gb(owner_least, 1)} for the "
                f"embedding, the LM head and {K} block(s) at each end but has {gb(owner.ram_bytes, 1)}; make "
                f"a device with more RAM the owner (--owner), lower --min-owner-blocks, or {fix}")
    return (f"no split of {table.model} into whole blocks fits: the blocks need {gb(whole.running, 1)} "
            f"or more with their activations in flight, and each device must hold its whole range "
            f"({listing}); {fix}")
