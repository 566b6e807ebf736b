"""``ringtune plan``: the fastest split of a model over given devices, as a table or plan JSON."""
from __future__ import annotations

import argparse
from pathlib import Path

from ringtune.base_dtype import BASE_DTYPE_CHOICES
from ringtune.plan import PLANNED_SCHEDULES
from ringtune.privacy_spec import GRADIENT_MECHANISMS, GRADIENT_PRIVACY_HELP, PRIVACY_ARG_HELP, PrivacySpec
from ringtune.wire import WIRE_HELP


def register(subparsers) -> None:
    parser = subparsers.add_parser("plan", help="plan the split of a model over devices (no weights needed)",
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", help="tiny-llama, tiny-gpt2, tiny-gemma3, smollm2-135m, or a local HF model directory")
    model.add_argument("--model-config", type=Path, metavar="FILE", help="a Hugging Face config.json")
    parser.add_argument("--device", action="append", default=[], metavar="PROFILE[:NAME]",
                        help="a device in the ring: a built-in profile or one from --device-file, "
                             "optionally named (repeat for each device)")
    parser.add_argument("--device-file", action="append", default=[], type=Path, metavar="FILE",
                        help="TOML/JSON device profiles (e.g. from 'ringtune profile --json'); without "
                             "--device, every device in the files is used")
    parser.add_argument("--discover", metavar="N|NAME,NAME",
                        help="plan over agents found over mDNS (their advertised profiles) instead of --device")
    parser.add_argument("--discover-timeout", type=float, default=15.0, help="seconds to wait for --discover")
    parser.add_argument("--interface", action="append", metavar="IP|IFACE", help="mDNS interfaces for --discover")
    parser.add_argument("--link-mbit", type=float, default=1000.0, help="link bandwidth of discovered agents")
    parser.add_argument("--owner", help="the device that holds the data (default: the first device, or the "
                                        "discovered agent advertising data)")
    parser.add_argument("--micro-batch-size", type=int, default=2, help="sequences per micro-batch")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--micro-batches", type=int, default=4, help="micro-batches per step")
    parser.add_argument("--schedule", choices=PLANNED_SCHEDULES, default="1f1b", help="pipeline schedule")
    parser.add_argument("--min-owner-blocks", type=int, default=1,
                        help="blocks the owner keeps at each end of the model (a --privacy preset raises it "
                             "to its own)")
    parser.add_argument("--privacy", default="off",
                        help="the run's privacy, as for ringtune train: " + PRIVACY_ARG_HELP)
    parser.add_argument("--grad-privacy", choices=GRADIENT_MECHANISMS, default="off",
                        help=GRADIENT_PRIVACY_HELP + " (planned as they run: forward-only stages cost their forward, "
                             "keep no activations and get no gradient back)")
    parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank")
    parser.add_argument("--lora-targets", default="all-linear",
                        help="comma-separated module names to adapt, or all-linear")
    parser.add_argument("--base-dtype", choices=BASE_DTYPE_CHOICES, default="auto",
                        help="how devices store the frozen base weights (priced in memory and time): auto is fp32 "
                             "when the model fits at fp32, else the widest dtype that fits")
    parser.add_argument("--wire", default="fp32", help=WIRE_HELP)
    parser.add_argument("--scored-share", type=float, default=1.0, metavar="SHARE",
                        help="share of positions the loss scores: 1 for plain text; for prompt/completion data "
                             "the owner measures it at train time (about 0.05 for the demo's tweets)")
    parser.add_argument("--json", action="store_true", help="print the plan JSON instead of a table")
    parser.set_defaults(run=run)


def devices_from_args(args) -> list:
    """The devices named on the command line (or discovered), in order."""
    from device_profiles import DeviceProfile, ProfileError, load_profiles, resolve_device

    if args.discover:
        from coordinator.commands.train import discover_agents, open_discovery

        with open_discovery(args) as discovery:
            owner, found = discover_agents(args, discovery)
        args.owner = owner
        return [DeviceProfile(a.name, a.ram_bytes, a.cores, a.gflops, args.link_mbit * 1e6 / 8,
                              sources={"gflops": "advertised by the agent", "ram_bytes": "advertised (total)",
                                       "link_bytes_per_s": "--link-mbit"}) for a in found]
    from_files = [p for path in args.device_file for p in load_profiles(path)]
    known = {p.name: p for p in from_files}
    devices = [resolve_device(spec, known) for spec in args.device] if args.device else from_files
    if not devices:
        raise ProfileError("no devices: give --device PROFILE[:NAME] (e.g. --device rpi5-8gb:pi-a) or "
                           "--device-file FILE")
    return devices


def run(args) -> int:
    from coordinator.planning import plan_run
    from ringtune.lora_spec import LoraSpec
    from ringtune.run_shape import RunShape
    from ringtune.wire import WireSpec

    if not 0 < args.scored_share <= 1:
        raise ValueError(f"--scored-share {args.scored_share:g}: give the share of positions the loss scores, "
                         f"in (0, 1] (1 for plain text)")
    devices = devices_from_args(args)
    owner = args.owner or devices[0].name
    wire = WireSpec.resolve(args.wire, min(d.link_bytes_per_s for d in devices))  # auto: by the slowest link
    privacy = PrivacySpec.parse(args.privacy, args.grad_privacy)
    shape = RunShape(args.micro_batch_size, args.seq_len, args.micro_batches, args.schedule,
                     privacy.owner_blocks(args.min_owner_blocks), args.scored_share, wire, privacy)
    targets = args.lora_targets if args.lora_targets == "all-linear" else tuple(args.lora_targets.split(","))
    model = args.model_config if args.model_config is not None else args.model
    plan = plan_run(model, devices, owner, shape, LoraSpec(r=args.lora_r, target_modules=targets),
                    base_dtype=args.base_dtype)
    if args.json:
        print(plan.to_json())
    else:
        print_plan(plan, devices)
        print(f"wire: {wire.describe()}; the loss scores {args.scored_share:.0%} of positions")
    return 0


def print_plan(plan, devices: list) -> None:
    """The plan as a table (one row per stage), each device's predicted memory, then the step time and throughput."""
    from coordinator.planning.costs import DEQUANTIZE_FLOPS
    from ringtune.console import print_table

    ram = {d.name: d.ram_bytes for d in devices}
    p = plan.predicted
    rows = [(str(i), stage.device, stage.role, f"[{stage.layers[0]}, {stage.layers[1]})",
             f"{p['stage_compute_seconds'][i]:.3f}", f"{p['stage_link_seconds'][i]:.3f}")
            for i, stage in enumerate(plan.stages)]
    print_table(("stage", "device", "role", "layers", "compute s", "link s"), rows, right=("stage", "compute s", "link s"))
    terms = ("baseline", "weights", "trainable", "activations", "workspace", "buffers", "heap", "heap_room")
    memory = [(name, f"{p['memory'][name]['total'] / 1e9:.2f} / {ram[name] / 1e9:.2f} GB",
               *(f"{p['memory'][name].get(term, 0) / 1e9:.3f}" for term in terms)) for name in plan.devices()]
    columns = ("runtime", "weights", "LoRA+AdamW", "activations", "workspace", "frames", "heap", "heap room")
    print_table(("device", "predicted peak / RAM", *columns), memory, title="memory per device (GB)", right=columns)
    print(f"predicted step: {p['step_seconds']:.3f} s for {plan.micro_batches} micro-batches of "
          f"{p['micro_batch_size']} x {p['seq_len']} tokens ({plan.schedule}), "
          f"{p['tokens_per_second']:.1f} tokens/s; bottleneck: {p['bottleneck']}")
    print(f"base weights: {plan.base_dtype} ({plan.base_dtype_reason})")
    if plan.privacy:
        print(f"privacy: {PrivacySpec.from_dict(plan.privacy).describe()}")
    if plan.base_dtype in DEQUANTIZE_FLOPS and DEQUANTIZE_FLOPS[plan.base_dtype]:
        print(f"time at {plan.base_dtype}: fp32 matmuls + dequantizing every frozen weight on each forward and "
              f"backward, priced at {DEQUANTIZE_FLOPS[plan.base_dtype]:g} FLOPs per weight per pass (measured on x86 "
              f"by benchmarks/base_dtype.py; live agents time their own blocks at {plan.base_dtype} instead)")
    unused = [d.name for d in devices if d.name not in plan.devices()]
    if unused:
        print(f"left out (they would make the step slower or do not fit): {', '.join(unused)}")
