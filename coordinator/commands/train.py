"""``ringtune train``: fine-tune over a ring of agents (given by URL, or started locally)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from coordinator.timeline import draw_timeline, require_matplotlib, typical_step
from ringtune.base_dtype import BASE_DTYPE_CHOICES
from ringtune.plan import SCHEDULES
from ringtune.privacy_spec import GRADIENT_MECHANISMS, GRADIENT_PRIVACY_HELP, PRIVACY_ARG_HELP, PrivacySpec
from ringtune.wire import WIRE_HELP, WireSpec


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="fine-tune with LoRA over a ring of agents",
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--agents", help="comma-separated control URLs of running agents (tcp://HOST:PORT)")
    where.add_argument("--local", type=int, metavar="N", help="start N agents on this machine (the first owns --data)")
    where.add_argument("--discover", metavar="N|NAME,NAME",
                       help="find agents over mDNS: a count, or names; waits up to --discover-timeout")
    parser.add_argument("--discover-timeout", type=float, default=15.0, help="seconds to wait for --discover")
    parser.add_argument("--interface", action="append", metavar="IP|IFACE",
                        help="mDNS interfaces for --discover (repeatable; default: all)")
    parser.add_argument("--token", default=os.environ.get("RINGTUNE_TOKEN"),
                        help="the agents' pairing token (default: $RINGTUNE_TOKEN)")
    parser.add_argument("--encrypt", action="store_true",
                        help="encrypt hidden states and gradients on the wire (ChaCha20-Poly1305), not only authenticate")
    parser.add_argument("--model", help="(required unless --resume) tiny-llama, tiny-gpt2, tiny-gemma3, smollm2-135m, or a local HF model directory")
    parser.add_argument("--owner", help="name of the agent that holds the data (default with --discover: the "
                                        "one agent advertising data)")
    parser.add_argument("--data", help="training data JSONL for the local owner (with --local)")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps")
    parser.add_argument("--micro-batches", type=int, default=4, help="micro-batches per step")
    parser.add_argument("--micro-batch-size", type=int, default=2, help="sequences per micro-batch")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--schedule", choices=SCHEDULES, default="1f1b", help="pipeline schedule")
    parser.add_argument("--lr", type=float, help="AdamW learning rate; when not given: 1e-3, or a --privacy preset's own")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank")
    parser.add_argument("--lora-alpha", type=int, default=16, help="LoRA alpha")
    parser.add_argument("--lora-targets", default="all-linear",
                        help="comma-separated module names to adapt, or all-linear")
    parser.add_argument("--seed", type=int, default=0, help="seed of the LoRA init and the data order")
    parser.add_argument("--base-dtype", choices=BASE_DTYPE_CHOICES, default="auto",
                        help="how devices store the frozen base weights: auto is fp32 when the model fits the "
                             "devices at fp32, else the widest dtype that fits (LoRA, gradients, optimizer state "
                             "and activations stay fp32)")
    parser.add_argument("--plan", type=Path, help="a saved plan JSON (ringtune plan --json) to run as is")
    parser.add_argument("--split", choices=["planned", "even"], default="planned",
                        help="planned: the exact partitioner over the agents' measured profiles (devices that "
                             "would slow the step are left out); even: blocks split evenly over all agents")
    parser.add_argument("--min-owner-blocks", type=int, default=1,
                        help="blocks the owner keeps at each end with --split planned (a --privacy preset raises it "
                             "to its own)")
    parser.add_argument("--privacy", default="off",
                        help="noise on hidden states leaving the owner: " + PRIVACY_ARG_HELP)
    parser.add_argument("--grad-privacy", choices=GRADIENT_MECHANISMS, default="off",
                        help=GRADIENT_PRIVACY_HELP)
    parser.add_argument("--link-mbit", type=float,
                        help="link bandwidth the planner assumes for every agent (default: measured to each "
                             "agent before planning, a short timed transfer)")
    parser.add_argument("--wire", default="fp32", help=WIRE_HELP)
    parser.add_argument("--timeline", action="store_true",
                        help="draw a typical step (a lane per stage, each micro-batch's forward and backward) to "
                             "timeline.png beside metrics.jsonl (needs matplotlib: pip install 'ringtune[bench]')")
    parser.add_argument("--threads", type=int, help="torch threads per local agent (default: cores / N)")
    parser.add_argument("--runtime", default="torch",
                        help="with --local: torch or executorch for every agent, or one per agent (owner first), "
                             "e.g. torch,executorch,executorch; remote agents choose with `ringtune agent --runtime`")
    parser.add_argument("--timeout", type=float, default=120.0, help="data-plane timeout in seconds")
    parser.add_argument("--heartbeat-timeout", type=float, default=5.0,
                        help="seconds without an answer before an agent is declared gone")
    parser.add_argument("--out", type=Path, help="(required unless --resume) output directory (the adapter, plan, "
                                                 "metrics, checkpoints)")
    parser.add_argument("--checkpoint-every", type=int, default=10, metavar="K",
                        help="checkpoint every K steps (a device leaving costs at most K steps of recomputation)")
    parser.add_argument("--rebalance", action="store_true",
                        help="at each checkpoint, take back devices that left and answer again")
    parser.add_argument("--pause-timeout", type=float, default=3600.0,
                        help="seconds a paused run waits for its owner, or for a device when the rest cannot hold "
                             "the model")
    parser.add_argument("--resume", type=Path, metavar="DIR",
                        help="continue the run saved in DIR (its --out) after the coordinator stopped; the run's "
                             "settings come from DIR, the agents from --agents/--local/--discover")
    parser.set_defaults(run=run)


def settings_from_args(args, owner: str):
    from coordinator.settings import TrainSettings
    from edge_runtime.models.lora import LoraSpec
    from ringtune.optimizer_spec import OptimizerSpec

    for flag in ("steps", "micro_batches", "micro_batch_size", "seq_len", "lora_r"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1")
    targets = args.lora_targets if args.lora_targets == "all-linear" else tuple(args.lora_targets.split(","))
    privacy = PrivacySpec.parse(args.privacy, args.grad_privacy)
    return TrainSettings(model=args.model, owner=owner, steps=args.steps, micro_batches=args.micro_batches,
                         micro_batch_size=args.micro_batch_size, seq_len=args.seq_len, out=args.out,
                         schedule=args.schedule, lora=LoraSpec(args.lora_r, args.lora_alpha, targets, args.seed),
                         optimizer=OptimizerSpec(lr=privacy.learning_rate(args.lr), weight_decay=args.weight_decay),
                         seed=args.seed,
                         data_timeout=args.timeout, heartbeat_timeout=args.heartbeat_timeout,
                         encrypt=args.encrypt, split=args.split,
                         min_owner_blocks=privacy.owner_blocks(args.min_owner_blocks),
                         link_bytes_per_s=args.link_mbit * 1e6 / 8 if args.link_mbit else None,
                         privacy=privacy, wire=args.wire, base_dtype=args.base_dtype)


def run(args) -> int:
    if not args.discover:
        return train(args, None)
    with open_discovery(args) as discovery:  # kept open: a paused run takes in devices found later
        return train(args, discovery)


def train(args, discovery) -> int:
    import secrets

    from coordinator.client import AgentClient
    from cluster.state import cluster_devices
    from coordinator.interrupt import Interrupt
    from coordinator.local import local_names, start_local_agents, stop_local_agents
    from coordinator.membership import AgentGone, Membership
    from coordinator.recovery import ResilientTrainer
    from coordinator.run_store import RunStore
    from coordinator.settings import RecoverySettings
    from edge_runtime.models.registry import load_config
    from edge_runtime.models.structure import sliceable_meta_model
    from ringtune.plan import Plan
    from ringtune.progress import progress_for_terminal
    from ringtune.protocol import Timeouts
    from ringtune.security import generate_token

    if args.resume:
        args.out = args.resume
    elif not args.model or not args.out:
        raise ValueError("--model and --out are required (or --resume DIR to continue a run)")
    else:
        sliceable_meta_model(load_config(args.model))  # an unknown or unsplittable model fails before any agent starts
        PrivacySpec.parse(args.privacy, args.grad_privacy).check_seq_len(args.seq_len)  # and so does a bad --privacy
        WireSpec.resolve(args.wire, float("inf"))  # and a bad --wire
    if args.timeline:
        require_matplotlib()
    store = RunStore(args.out)
    resumed = store.read_run() if args.resume else None
    plan = Plan.from_json(args.plan.read_text()) if args.plan else None
    local, names = [], None
    token = args.token
    if args.local is not None:
        if args.local < 1 or not args.data:
            raise ValueError("--local N needs N >= 1 and --data FILE (the owner's training data)")
        token = generate_token()
        owner = local_names(args.local)[0]
        print(f"starting {args.local} local agent(s) ...", flush=True)
        local = start_local_agents(args.local, args.data, store.logs, token, threads=args.threads,
                                   runtimes=local_runtimes(args.runtime))
        urls = [agent.url for agent in local]
    elif args.runtime != "torch":
        raise ValueError("--runtime is for --local agents; start remote agents with `ringtune agent --runtime ...`")
    elif args.discover:
        owner, found = discover_agents(args, discovery, resumed[1] if resumed else "")
        urls = [advert.control_url for advert in found]
        names = None if args.discover.isdigit() else frozenset(a.name for a in found)
    else:
        if not args.owner and not args.resume:
            raise ValueError("--agents needs --owner NAME (the agent started with --data)")
        owner, urls = args.owner, [u.strip() for u in args.agents.split(",") if u.strip()]
    if not token:
        raise ValueError("set RINGTUNE_TOKEN to the agents' pairing token (each agent prints it at its first start "
                         "and keeps it in its state directory); --token TOKEN works too, but other users of this "
                         "machine can read a command line")
    watched = [*local, *cluster_devices(urls)]  # agents whose death we can explain

    def check_alive(names) -> None:
        for agent in watched:
            status = agent.exit_status()
            if status and agent.name in names:
                raise AgentGone(agent.name, f"agent {agent.name} {status}; its log: {agent.log_path}\n{agent.log_tail()}")

    settings, lineage = resumed if resumed else (settings_from_args(args, owner), secrets.token_hex(8))
    timeouts = Timeouts(heartbeat=settings.heartbeat_timeout)
    clients = [AgentClient(url, timeouts) for url in urls]
    members = Membership(token, secrets.token_hex(8), lineage, timeouts, names, check_alive)
    progress = progress_for_terminal()
    interrupt = Interrupt()
    try:
        with interrupt.installed():
            members.join_all(clients, settings.owner)
            recovery = RecoverySettings(args.checkpoint_every, args.rebalance, args.pause_timeout,
                                        resume=bool(args.resume))
            find_agents = (lambda: [advert.control_url for advert in discovery.table.seen()[1]]) if discovery else None
            result = ResilientTrainer(settings, recovery, members, store, progress, find_agents, interrupt).run(plan)
    finally:
        progress.close()
        members.close()
        for client in clients:
            client.close()
        stop_local_agents(local)
    print(f"loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f} over {len(result.losses)} steps, "
          f"{result.tokens_per_second:.0f} tokens/s")
    print(f"adapter: {result.adapter_dir} (load with peft.PeftModel.from_pretrained(base_model, "
          f"'{result.adapter_dir}'))")
    if args.timeline:
        from coordinator.run_store import step_records

        print(f"timeline: {draw_timeline(typical_step(step_records(args.out)), store.timeline)}")
    return 0


def local_runtimes(text: str) -> tuple[str, ...]:
    runtimes = tuple(r.strip() for r in text.split(","))
    unknown = sorted(set(runtimes) - {"torch", "executorch"})
    if unknown:
        raise ValueError(f"unknown runtime(s) {unknown} in --runtime: use torch or executorch, or a comma list")
    return runtimes


def open_discovery(args):
    """An mDNS browser on the --interface(s); close it when done."""
    from coordinator.discovery.mdns import MdnsDiscovery
    from edge_runtime.discovery.interfaces import parse_interfaces

    return MdnsDiscovery(interfaces=parse_interfaces(args.interface))


def discover_agents(args, discovery, lineage: str = "") -> tuple[str, list]:
    """The owner's name and the adverts of the agents found over mDNS (--discover); lineage: the run being
    resumed (agents busy with it count as free)."""
    wanted: int | list[str] = int(args.discover) if args.discover.isdigit() else args.discover.split(",")
    print(f"looking for {wanted} agent(s) over mDNS ...", flush=True, file=sys.stderr)
    found = discovery.wait_for(wanted, args.discover_timeout, lineage)
    if isinstance(wanted, int):
        found = sorted(found, key=lambda a: (not a.has_data, a.name))[:wanted]
    owner = args.owner or _the_owner(found)
    print("found " + ", ".join(f"{a.name} ({a.control_url})" for a in found), flush=True, file=sys.stderr)
    return owner, found


def _the_owner(found) -> str:
    owners = [a.name for a in found if a.has_data]
    if len(owners) != 1:
        raise ValueError(f"{len(owners)} of the agents found hold data ({owners}): name the owner with --owner NAME")
    return owners[0]
