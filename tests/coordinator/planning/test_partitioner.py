"""The partitioner against an independent brute force over every ring order, subset and split, with every
stage training and with the owner withholding gradients (only its tail trains, the other stages run forward)."""
from __future__ import annotations

import itertools
import math
import random
from dataclasses import replace

import pytest

from coordinator.planning.cost_table import CostTable, EndCost
from coordinator.planning.costs import DEQUANTIZE_FLOPS
from coordinator.planning.memory import check_fits, plan_memory
from coordinator.planning.partitioner import DoesNotFitError, partition
from device_profiles import DeviceProfile
from ringtune.plan import Plan, PlanError, StageSpec, validate_plan
from ringtune.privacy_spec import PrivacySpec
from ringtune.run_shape import RunShape
from ringtune.wire import WireSpec, payload_bytes


def random_instance(rng: random.Random) -> tuple[CostTable, list[DeviceProfile], RunShape]:
    num_blocks = rng.randint(1, 6)
    seq_len = rng.randint(1, 3)
    # Integer byte counts keep memory sums exact, so feasibility at the boundary is unambiguous.
    table = CostTable(
        model="random", seq_len=seq_len,
        block_param_bytes=tuple(rng.randint(1, 60) for _ in range(num_blocks)),
        block_trainable_bytes=tuple(rng.randint(0, 20) for _ in range(num_blocks)),
        block_activation_bytes=tuple(float(rng.randint(0, 10)) for _ in range(num_blocks)),
        block_workspace_bytes=tuple(float(rng.randint(0, 10)) for _ in range(num_blocks)),
        block_forward_flops=tuple(float(rng.randint(1, 100)) for _ in range(num_blocks)),
        block_backward_flops=tuple(float(rng.randint(1, 100)) for _ in range(num_blocks)),
        cut_bytes=float(4 * rng.randint(1, 3)),
        head_end=EndCost(rng.randint(0, 40), 0, float(rng.randint(0, 5)), float(rng.randint(0, 20)), 0.0),
        tail_end=EndCost(rng.randint(0, 40), rng.randint(0, 8), float(rng.randint(0, 10)),
                         float(rng.randint(0, 50)), float(rng.randint(0, 50)), float(rng.randint(0, 20))),
        scored_end=EndCost(0, 0, float(rng.randint(0, 40)), float(rng.randint(0, 200)), float(rng.randint(0, 200)),
                           float(rng.randint(0, 20))))
    kinds = [DeviceProfile(f"kind{i}", rng.randint(150, 1300), 4, rng.choice([0.5, 1.0, 2.0, 3.0, 5.0]) * 1e-6,
                           rng.choice([200.0, 1000.0, 1e4, 1e5]), baseline_bytes=rng.randint(1, 40))
             for i in range(rng.randint(1, 4))]
    # Repeating kinds exercises the grouping of interchangeable devices.
    devices = [rng.choice(kinds).renamed(f"d{i}") for i in range(rng.randint(1, 5))]
    shape = RunShape(micro_batch_size=rng.randint(1, 2), seq_len=seq_len, micro_batches=rng.randint(1, 6),
                     schedule=rng.choice(["1f1b", "gpipe"]), min_owner_blocks=rng.randint(0, 2),
                     scored_share=rng.choice([1.0, 0.5, 0.25]), wire=rng.choice([WireSpec(), WireSpec("int8", "bf16")]))
    # Compact weights add their dequantization to the time of the blocks and of the LM head holding them.
    table = replace(table, base_dtype=rng.choice(list(DEQUANTIZE_FLOPS)),
                    block_compact_weights=tuple(rng.randint(0, 5) for _ in range(num_blocks)),
                    scored_end=replace(table.scored_end, compact_weights=rng.randint(0, 5)))
    return table, devices, shape


def evaluate(table: CostTable, devices: dict[str, DeviceProfile], owner: str, shape: RunShape,
             ranges: list[tuple[str, int, int]]) -> tuple[float, dict[str, float]]:
    """(step seconds, memory bytes per device) of a ring written as (device, start, end) stages,
    head first and tail last on the owner; one stage is the owner alone. A stage that does not train
    (shape.privacy) costs its forward and sends no gradient back. Memory is the model that checks any
    finished plan (coordinator.planning.memory, tested on its own in test_memory.py)."""
    tokens = shape.micro_batch_size * shape.seq_len
    num_stages = len(ranges)
    roles = ["full"] if num_stages == 1 else ["head", *["middle"] * (num_stages - 2), "tail"]
    costs, busy = [], {}
    for index, ((name, start, end), role) in enumerate(zip(ranges, roles)):
        device = devices[name]
        trains = shape.privacy.trains(role)
        blocks = range(start, end)
        ends = []
        if index == 0:
            ends.append(table.head_end)
        if index == num_stages - 1:
            ends.append(table.tail_end)
        passes = [e.forward_flops for e in ends] + [table.block_forward_flops[b] for b in blocks]
        if trains:
            passes += [e.backward_flops for e in ends] + [table.block_backward_flops[b] for b in blocks]
        flops = sum(passes)
        if index == num_stages - 1:  # the LM head and the loss run on the scored positions only
            flops += (table.scored_end.forward_flops + trains * table.scored_end.backward_flops) * shape.scored_share
        compact = sum(table.block_compact_weights[b] for b in blocks) + sum(e.compact_weights for e in ends)
        compact += table.scored_end.compact_weights if index == num_stages - 1 else 0  # however many are scored
        dequantize = (2 if trains else 1) * DEQUANTIZE_FLOPS[table.base_dtype] * compact  # once forward, once backward
        seconds = (flops * tokens + dequantize) / (device.gflops * 1e9)
        if index < num_stages - 1:
            receiver = devices[ranges[index + 1][0]]
            # hidden state forward, gradient back if this stage trains, each in its codec's bytes
            kinds = ("activation", "gradient") if trains else ("activation",)
            sent = sum(payload_bytes(shape.wire.codec(kind), tokens, table.hidden_size) for kind in kinds)
            seconds += sent / min(device.link_bytes_per_s, receiver.link_bytes_per_s)
        costs.append(seconds)
        busy[name] = busy.get(name, 0.0) + seconds
    plan = Plan(table.model, owner, tuple(StageSpec(name, (start, end), role)
                                          for (name, start, end), role in zip(ranges, roles)),
                shape.schedule, shape.micro_batches, privacy=shape.privacy.public_dict())
    footprints = plan_memory(table, shape, plan, {name: d.baseline_bytes for name, d in devices.items()})
    memory = {name: float(f.total) for name, f in footprints.items()}
    return sum(costs) + (shape.micro_batches - 1) * max(busy.values()), memory


def brute_force(table: CostTable, devices: list[DeviceProfile], owner: str, shape: RunShape) -> float:
    """Smallest step seconds over every plan that fits, or inf."""
    by_name = {d.name: d for d in devices}
    L, K = table.num_blocks, shape.min_owner_blocks
    others = [d.name for d in devices if d.name != owner]
    best = math.inf
    rings = [[(owner, 0, L)]]
    for count in range(1, len(others) + 1):
        for order in itertools.permutations(others, count):
            for head_end in range(K, L + 1):
                for tail_start in range(head_end + count, L - K + 1):
                    for cuts in itertools.combinations(range(head_end + 1, tail_start), count - 1):
                        bounds = [head_end, *cuts, tail_start]
                        rings.append([(owner, 0, head_end),
                                      *((d, bounds[i], bounds[i + 1]) for i, d in enumerate(order)),
                                      (owner, tail_start, L)])
    for ring in rings:
        step, memory = evaluate(table, by_name, owner, shape, ring)
        if all(memory[name] <= by_name[name].ram_bytes for name in memory):
            best = min(best, step)
    return best


def plan_ranges(plan: Plan) -> list[tuple[str, int, int]]:
    return [(s.device, s.layers[0], s.layers[1]) for s in plan.stages]


@pytest.mark.parametrize("gradient", ["off", "withhold"])
def test_partitioner_equals_brute_force_on_random_instances(gradient):
    rng = random.Random(20240601)
    fitted = failed = split = 0
    for _ in range(400):
        table, devices, shape = random_instance(rng)
        shape = replace(shape, privacy=PrivacySpec(gradient=gradient))
        owner = devices[0].name
        expected = brute_force(table, devices, owner, shape)
        if math.isinf(expected):
            with pytest.raises(DoesNotFitError):
                partition(table, devices, owner, shape)
            failed += 1
            continue
        plan = partition(table, devices, owner, shape)
        validate_plan(plan, table.num_blocks)
        assert PrivacySpec.from_dict(plan.privacy).gradient == gradient  # what check_fits prices it by
        step, memory = evaluate(table, {d.name: d for d in devices}, owner, shape, plan_ranges(plan))
        assert step == pytest.approx(expected, rel=1e-9)
        assert plan.predicted["step_seconds"] == pytest.approx(step, rel=1e-9)
        by_name = {d.name: d for d in devices}
        for name, used in memory.items():
            assert used <= by_name[name].ram_bytes
            assert plan.predicted["memory_bytes"][name] == pytest.approx(used)
        fitted += 1
        split += len(plan.stages) > 1
    assert split > 60 and fitted - split > 60 and failed > 60  # every outcome is exercised


def test_every_block_assigned_once_and_middle_devices_distinct():
    rng = random.Random(7)
    for _ in range(100):
        table, devices, shape = random_instance(rng)
        try:
            plan = partition(table, devices, devices[0].name, shape)
        except DoesNotFitError:
            continue
        covered = [b for s in plan.stages for b in range(*s.layers)]
        assert covered == list(range(table.num_blocks))
        middles = [s.device for s in plan.stages[1:-1]]
        assert len(set(middles)) == len(middles) and devices[0].name not in middles


def test_slow_device_is_left_out():
    table = CostTable("m", 1, (10,) * 8, (0,) * 8, (0.0,) * 8, (0.0,) * 8, (100.0,) * 8, (100.0,) * 8, 1.0,
                      EndCost(0, 0, 0.0, 0.0, 0.0), EndCost(0, 0, 0.0, 0.0, 0.0), EndCost(0, 0, 0.0, 0.0, 0.0))
    fast = DeviceProfile("fast", 1000, 4, 1e-6, 1e9, baseline_bytes=1)
    slow = DeviceProfile("slow", 1000, 4, 1e-9, 1e9, baseline_bytes=1)
    plan = partition(table, [fast, fast.renamed("fast2"), slow], "fast", RunShape(1, 1, 8, "1f1b", 1))
    assert "slow" not in plan.devices() and "fast2" in plan.devices()


def test_the_tail_is_priced_by_the_scored_share():
    """An LM head as costly as 6 blocks on every position: plain text (every position scored) leaves the
    owner only its minimum, while prompt/completion data scoring 1 position in 16 gives it more blocks."""
    table = CostTable("m", 1, (10,) * 12, (0,) * 12, (0.0,) * 12, (0.0,) * 12, (100.0,) * 12, (100.0,) * 12, 1.0,
                      EndCost(0, 0, 0.0, 0.0, 0.0), EndCost(0, 0, 0.0, 0.0, 0.0), EndCost(0, 0, 0.0, 600.0, 600.0))
    devices = [DeviceProfile(f"d{i}", 1000, 4, 1e-6, 1e9, baseline_bytes=1) for i in range(3)]

    def owner_blocks(share: float) -> int:
        plan = partition(table, devices, "d0", RunShape(1, 1, 8, "1f1b", 1, scored_share=share))
        return sum(s.layers[1] - s.layers[0] for s in plan.stages if s.device == "d0")

    assert owner_blocks(1.0) == 2 and owner_blocks(1 / 16) >= 4
    with pytest.raises(PlanError, match="share of scored positions"):
        partition(table, devices, "d0", RunShape(1, 1, 8, "1f1b", 1, scored_share=0.0))


# Three blocks of 40 bytes keeping 30 bytes per token for a backward; 1 FLOP per token forward, 2 backward;
# hidden size 1 (4 bytes per token in fp32). 2 tokens a micro-batch, 4 micro-batches, 1F1B, one owner block at
# each end: the only split is owner [0, 1), pi [1, 2), owner [2, 3).
THREE = CostTable("m", 1, (40,) * 3, (2,) * 3, (30.0,) * 3, (5.0,) * 3, (1.0,) * 3, (2.0,) * 3, 4.0,
                  EndCost(7, 0, 0.0, 0.0, 0.0), EndCost(11, 0, 1.0, 1.0, 1.0, workspace_bytes=8.0),
                  EndCost(0, 0, 3.0, 9.0, 9.0, workspace_bytes=12.0))


def test_withheld_gradients_price_forward_only_stages_and_fit_what_training_does_not():
    """Training, the owner needs 604 bytes on the split (472 alone) and the pi 368: neither fits in 450 and 300.
    Withholding gradients, the head and the pi run forward only: they keep nothing for a backward and hold no
    LoRA gradients or AdamW state (frames may wait for all 4 micro-batches instead): 430 and 262 fit. Their time
    is their forward alone and their links carry no gradient back."""
    owner = DeviceProfile("owner", 450, 4, 1e-9, 4.0, baseline_bytes=100)  # 1 FLOP/s, 4 bytes/s
    pi = DeviceProfile("pi", 300, 4, 1e-9, 4.0, baseline_bytes=100)
    training = RunShape(2, 1, 4, "1f1b", 1)
    withheld = replace(training, privacy=PrivacySpec(gradient="withhold"))
    with pytest.raises(DoesNotFitError):
        partition(THREE, [owner, pi], "owner", training)
    plan = partition(THREE, [owner, pi], "owner", withheld)
    assert plan_ranges(plan) == [("owner", 0, 1), ("pi", 1, 2), ("owner", 2, 3)]
    baselines = {"owner": 100, "pi": 100}
    as_training = plan_memory(THREE, training, replace(plan, privacy={}), baselines)
    assert {name: f.total for name, f in as_training.items()} == {"owner": 604, "pi": 368}
    predicted = plan.predicted
    assert predicted["memory_bytes"] == {"owner": 430, "pi": 262}
    # the pre-run check (session.prepare: the plan's own privacy, a shape without it) agrees to the byte
    checked = check_fits(THREE, RunShape(2, 1, 4, "1f1b"), plan, [owner, pi])
    assert {name: int(f.total) for name, f in checked.items()} == predicted["memory_bytes"]
    assert checked["pi"].trainable == checked["pi"].activations == 0 and checked["owner"].trainable == 2
    # head: block 0 forward, 2 FLOPs; pi: block 1 forward; tail: block 2 (6) + norm (4) + LM head and loss (36),
    # forward and backward. Each link: the 8-byte hidden state at 4 bytes/s, no gradient back (it would be 4 s).
    assert predicted["stage_compute_seconds"] == pytest.approx([2.0, 2.0, 46.0])
    assert predicted["stage_link_seconds"] == pytest.approx([2.0, 2.0, 0.0])
    # fill and drain (4 + 4 + 46), then 3 more micro-batches at the owner's pace (head 4 + tail 46)
    assert predicted["step_seconds"] == pytest.approx(54 + 3 * 50) and predicted["bottleneck"] == "owner"
