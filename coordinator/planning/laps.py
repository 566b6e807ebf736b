"""A ring of several laps: each device's blocks in several ranges, so its stages fill each other's bubbles.

In a one-lap ring every device idles while the first micro-batch fills the pipeline and the last one drains it:
about (S - 1) stage times of a step of M + S - 1 (3M / (M + 2) of one device for S = 3 equal devices). With
``laps`` laps the micro-batches go round the devices that many times (owner head, every helper, the owner again,
every helper, ..., owner tail): each device keeps its block count, in ``laps`` ranges (the owner ``laps + 1``),
and a stage of a later lap runs while the device would wait for an early one's frames, as Megatron-LM's
interleaved schedule does (Narayanan et al., 2021). What it costs: every micro-batch crosses ``laps`` times the
links, and a device keeps more micro-batches in flight (its early-lap stages sit far from the tail).

Planning is pure: the one-lap plan's counts per device, re-cut; the step is simulated
(``coordinator.planning.pipeline_sim``) and the memory checked with the model that checks any plan.
"""
from __future__ import annotations

from dataclasses import replace

from coordinator.planning.costs import CostTable
from coordinator.planning.memory import check_fits
from coordinator.planning.pipeline_sim import SimStage, simulate_step
from device_profiles.profile import DeviceProfile
from ringtune.plan import Plan, PlanError, StageSpec, validate_plan
from ringtune.run_shape import RunShape


def lap_stages(plan: Plan, laps: int) -> tuple[StageSpec, ...]:
    """The stages of a ``laps``-lap ring over the devices of one-lap ``plan``, each keeping its block count:
    a helper's blocks in ``laps`` ranges, the owner's in ``laps + 1`` (head, one between laps, tail), larger
    ranges first in the middle of the owner's (its tail also runs the LM head and the loss)."""
    helpers = plan.stages[1:-1]
    owner_blocks = plan.stages[0].num_layers + plan.stages[-1].num_layers
    short = [(s.device, s.num_layers) for s in helpers if s.num_layers < laps]
    if owner_blocks < laps + 1:
        short.insert(0, (plan.owner, owner_blocks))
    if short:
        raise PlanError(f"{laps} laps need at least {laps} blocks per device and {laps + 1} on the owner; "
                        + ", ".join(f"{d} has {n}" for d, n in short) + ": use fewer --laps or fewer devices")
    owner_ranges = _owner_split(owner_blocks, laps)
    helper_ranges = {s.device: _split(s.num_layers, laps) for s in helpers}
    order = [(plan.owner, owner_ranges[0], "head")]
    for lap in range(laps):
        order += [(s.device, helper_ranges[s.device][lap], "middle") for s in helpers]
        order.append((plan.owner, owner_ranges[lap + 1], "tail" if lap == laps - 1 else "middle"))
    stages, start = [], 0
    for device, blocks, role in order:
        stages.append(StageSpec(device, (start, start + blocks), role))
        start += blocks
    return tuple(stages)


def _split(blocks: int, parts: int) -> list[int]:
    """blocks in parts ranges as even as possible, the larger first."""
    return [blocks // parts + (i < blocks % parts) for i in range(parts)]


def _owner_split(blocks: int, laps: int) -> list[int]:
    """The owner's laps + 1 ranges: head, the ranges between laps, tail; the extra blocks go between laps
    first, then to the head, so the tail (which also runs the LM head and loss) is never the larger."""
    sizes = _split(blocks, laps + 1)  # larger first
    middles = sizes[:laps - 1]
    head, tail = sizes[laps - 1], sizes[laps]
    return [head, *middles, tail]


def looped_plan(table: CostTable, profiles: list[DeviceProfile], shape: RunShape, plan: Plan, laps: int) -> Plan:
    """The ``laps``-lap ring over one-lap ``plan``'s devices, with its simulated step and checked memory.
    Raises PlanError when the run cannot go round more than once, DoesNotFitError when a device lacks the
    memory for the micro-batches its early-lap stages keep in flight."""
    if laps < 1:
        raise PlanError(f"--laps must be at least 1, got {laps}")
    if laps == 1 or len(plan.stages) < 3:
        return plan
    if shape.privacy.public_dict():
        raise PlanError("--laps needs the privacy off: the owner's privatization and its audit cover a ring of "
                        "one lap (run with --laps 1, or without --privacy / --grad-privacy)")
    looped = replace(plan, stages=lap_stages(plan, laps), predicted={})
    ends = looped.stages[0].num_layers, looped.stages[-1].num_layers
    if min(ends) < shape.min_owner_blocks:
        raise PlanError(f"{laps} laps leave the owner {min(ends)} block(s) at an end, fewer than --min-owner-blocks "
                        f"{shape.min_owner_blocks}: use fewer --laps")
    validate_plan(looped, table.num_blocks)
    memory = check_fits(table, shape, looped, profiles)
    by_name = {p.name: p for p in profiles}
    sim = sim_stages(table, shape, looped, by_name)
    step = simulate_step(sim, shape.schedule, shape.micro_batches)
    busy = {}
    for stage in sim:
        busy[stage.device] = busy.get(stage.device, 0.0) + stage.forward_seconds + stage.backward_seconds
    predicted = {**plan.predicted, "step_seconds": step, "laps": laps,
                 "tokens_per_second": shape.tokens * shape.micro_batches / step,
                 "bottleneck": max(busy, key=busy.get),
                 "stage_compute_seconds": [s.forward_seconds + s.backward_seconds for s in sim],
                 "stage_link_seconds": [s.link_seconds for s in sim],
                 "memory_bytes": {name: int(f.total) for name, f in memory.items()},
                 "memory": {name: f.to_dict() for name, f in memory.items()}}
    return replace(looped, predicted=predicted)


def sim_stages(table: CostTable, shape: RunShape, plan: Plan, profiles: dict[str, DeviceProfile]) -> list[SimStage]:
    """Each stage's forward and backward seconds on its device (the partitioner's prices: FLOPs at the device's
    calibrated speed) and its link's seconds per frame."""
    tokens = shape.tokens
    forward = table.block_flops(tokens, trains=False)
    both = table.block_flops(tokens)
    stages = []
    for index, spec in enumerate(plan.stages):
        start, end = spec.layers
        f, fb = sum(forward[start:end]), sum(both[start:end])
        for end_cost, share in _ends(table, spec.role, shape):
            f += table.end_flops(end_cost, tokens * share, trains=False)
            fb += table.end_flops(end_cost, tokens * share)
        device = profiles[spec.device]
        speed = device.gflops * 1e9
        link = 0.0
        if index + 1 < len(plan.stages):
            receiver = profiles[plan.stages[index + 1].device]
            per_token = max(shape.wire.bytes_per_token(kind, table.hidden_size) for kind in ("activation", "gradient"))
            link = tokens * per_token / min(device.link_bytes_per_s, receiver.link_bytes_per_s)
        stages.append(SimStage(spec.device, f / speed, (fb - f) / speed, link))
    return stages


def _ends(table: CostTable, role: str, shape: RunShape):
    """The owner's ends a stage of this role runs, with the share of the tokens each runs on."""
    if role in ("head", "full"):
        yield table.head_end, 1.0
    if role in ("tail", "full"):
        yield table.tail_end, 1.0
        yield table.scored_end, shape.scored_share
