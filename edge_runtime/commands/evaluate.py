"""``ringtune evaluate``: held-out loss and label accuracy, base model vs. base + adapter (on the owner)."""
from __future__ import annotations

import json
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser("evaluate", help="compare the base model and a trained adapter on held-out data")
    parser.add_argument("--model", required=True, help="the base model the adapter was trained on")
    parser.add_argument("--adapter", required=True, type=Path, help="directory written by ringtune train --out")
    parser.add_argument("--data", required=True, help="held-out JSONL (same format as training data)")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--limit", type=int, default=0, help="evaluate only the first N records (0: all)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(run=run)


def run(args) -> int:
    from peft import PeftModel

    from edge_runtime.data.dataset import read_records
    from edge_runtime.evaluation import evaluate, greedy_completion
    from edge_runtime.models.registry import load_model, load_tokenizer
    from ringtune.adapter_metadata import trained_privacy

    if not (args.adapter / "adapter_config.json").is_file():
        raise ValueError(f"{args.adapter} has no adapter_config.json: pass the --out directory of a finished run")
    records = read_records(args.data)
    records = records[:args.limit] if args.limit else records
    tokenizer = load_tokenizer(args.model)
    hide_labels = trained_privacy(args.adapter).hide_labels  # then it learned one label token after the prompt
    base = evaluate(load_model(args.model), tokenizer, records, args.seq_len, hide_labels=hide_labels)
    tuned_model = PeftModel.from_pretrained(load_model(args.model), str(args.adapter)).eval()
    tuned = evaluate(tuned_model, tokenizer, records, args.seq_len, hide_labels=hide_labels)
    example = records[0]
    generation = greedy_completion(tuned_model, tokenizer, example.prompt) if example.prompt else ""
    result = {"examples": base.examples, "loss_before": base.loss, "loss_after": tuned.loss,
              "accuracy_before": base.accuracy, "accuracy_after": tuned.accuracy,
              "example_prompt": example.prompt, "example_expected": example.completion,
              "example_generated": generation, "adapter": str(args.adapter), "hide_labels": hide_labels}
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"held-out loss on {base.examples} examples: {base.loss:.4f} before -> {tuned.loss:.4f} after fine-tuning")
    if base.accuracy is not None:
        scored = " (scored as trained: one label token after the prompt, hide_labels)" if hide_labels else ""
        print(f"label accuracy: {base.accuracy:.1%} before -> {tuned.accuracy:.1%} after{scored}")
    if example.prompt:
        print(f"example: {example.prompt!r}\n  expected {example.completion!r}, generated {generation!r}")
    print(f"adapter: {args.adapter}")
    return 0

