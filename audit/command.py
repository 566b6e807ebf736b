"""``ringtune audit``: what a curious middle device recovers under a privacy setting, and what it costs."""
from __future__ import annotations

import argparse
from pathlib import Path

from ringtune.privacy_spec import GRADIENT_MECHANISMS, PRIVACY_ARG_HELP, PrivacySpec


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "audit", help="simulate a curious middle device: token and label recovery vs. utility per privacy setting",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="tiny-llama, tiny-gpt2, smollm2-135m, or a local HF model directory")
    parser.add_argument("--data", required=True, help="the owner's private training JSONL")
    parser.add_argument("--test", help="held-out JSONL: fine-tune under each setting and report its utility")
    parser.add_argument("--owner-blocks", default="1,2,4", help="comma-separated K: blocks the owner keeps at each end")
    parser.add_argument("--privacy", action="append", default=[], help="a setting to audit (repeatable; no "
                        "privatization is included unless --no-baseline): " + PRIVACY_ARG_HELP)
    parser.add_argument("--dchi-ratios", default="",
                        help="comma-separated r: also audit d_chi calibrated per K with clip = median hidden-state "
                             "norm at the cut and mean noise norm = r * clip")
    parser.add_argument("--clip-quantile", type=float, default=0.5,
                        help="the --dchi-ratios settings clip each token at this quantile of the public text's "
                             "token norms at the cut (their noise stays relative to the median)")
    parser.add_argument("--grad-privacy", choices=GRADIENT_MECHANISMS, default="off",
                        help="gradient mechanism of the --dchi-ratios settings")
    parser.add_argument("--public-prefix", metavar="N|auto",
                        help="the --dchi-ratios settings and presets send the first N positions unprivatized "
                             "(public=N) and calibrate their clip on the positions after them; auto: the longest "
                             "token prefix every training record shares")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the setting without privatization (e.g. when it was audited in another run)")
    parser.add_argument("--steps", type=int, default=20, help="fine-tuning steps per setting (with --test)")
    parser.add_argument("--eval-every", type=int, default=0,
                        help="with --test: also evaluate every N steps (a learning curve in audit.json)")
    parser.add_argument("--adapters", type=Path,
                        help="with --test: write each fine-tuned setting's adapter (peft format) under this directory; "
                             "an adapter an earlier audit of the same run and setting wrote there is reused (the "
                             "attacks run again without fine-tuning again)")
    parser.add_argument("--micro-batches", type=int, default=2, help="micro-batches per step")
    parser.add_argument("--micro-batch-size", type=int, default=4, help="sequences per micro-batch")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--lr", type=float, help="AdamW learning rate of every fine-tune; when not given: 1e-3, or "
                                                 "a preset's own for its setting, as ringtune train runs it")
    parser.add_argument("--test-limit", type=int, default=60, help="held-out records evaluated (0: all)")
    parser.add_argument("--attack-records", type=int, default=64,
                        help="private records whose hidden states the token attacks invert")
    parser.add_argument("--label-records", type=int, default=48,
                        help="private records whose gradients the label attacks score")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data order, LoRA init and simulated noise")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--out", type=Path, required=True, help="directory for audit.json, audit.md and audit.png")
    parser.set_defaults(run=run)


def settings_from_args(args):
    from audit.simulation import AuditSettings
    from edge_runtime.data.dataset import read_records

    for flag in ("steps", "micro_batches", "micro_batch_size", "seq_len", "threads", "attack_records", "label_records"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1")
    if not 0 < args.clip_quantile <= 1:
        raise ValueError(f"--clip-quantile {args.clip_quantile}: give a quantile in (0, 1], e.g. 0.5 (the median)")
    if args.eval_every < 0:
        raise ValueError("--eval-every must be 0 (only at the end) or a number of steps")
    train = read_records(args.data)
    test = read_records(args.test) if args.test else []
    return AuditSettings(model=args.model, train=train,
                         test=test[:args.test_limit] if args.test_limit else test,
                         owner_blocks=_numbers("--owner-blocks", args.owner_blocks, int),
                         privacy=tuple(PrivacySpec.parse(p, args.grad_privacy) for p in args.privacy),
                         dchi_ratios=_numbers("--dchi-ratios", args.dchi_ratios, float),
                         clip_quantile=args.clip_quantile,
                         public_prefix=_public_prefix(args.public_prefix, train, args.model, args.seq_len),
                         grad_privacy=args.grad_privacy, baseline=not args.no_baseline, steps=args.steps,
                         micro_batches=args.micro_batches,
                         micro_batch_size=args.micro_batch_size, seq_len=args.seq_len, lr=args.lr, seed=args.seed,
                         attack_records=args.attack_records, label_records=args.label_records,
                         eval_every=args.eval_every if args.test else 0, adapters=args.adapters if args.test else None)


def _public_prefix(text: str | None, train, model: str, seq_len: int) -> int | None:
    """--public-prefix as a number of positions, checked against what the training records share."""
    if text is None:
        return None
    from edge_runtime.data.dataset import common_prefix_length, encode_record
    from edge_runtime.models.registry import load_tokenizer

    tokenizer = load_tokenizer(model)
    shared = common_prefix_length([encode_record(r, tokenizer, seq_len)[0] for r in train])
    if text.strip() == "auto":
        return min(shared, seq_len - 1)  # at least one position stays private
    if not text.strip().isdigit():
        raise ValueError(f"--public-prefix {text!r}: expected a whole number of leading positions, or auto")
    if int(text) > shared:
        raise ValueError(f"--public-prefix {text}: the training records share only their first {shared} token(s), "
                         f"so later positions may be private: use --public-prefix auto or at most {shared}")
    if int(text) >= seq_len:
        raise ValueError(f"--public-prefix {text} leaves no private position in {seq_len} tokens: lower it or "
                         f"raise --seq-len")
    return int(text)


def _numbers(flag: str, text: str, kind) -> tuple:
    try:
        values = tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected comma-separated numbers, e.g. 1,2,4") from None
    if any(v <= 0 for v in values):
        raise ValueError(f"{flag} {text!r}: every value must be positive")
    return values


def run(args) -> int:
    import torch

    from audit.report import plot, table, targets_note, write_json
    from audit.simulation import TABLE_HEADER, recovery_note, run_audit
    from edge_runtime.models.registry import load_config

    torch.set_num_threads(args.threads)
    load_config(args.model)  # an unknown model fails before any work
    settings = settings_from_args(args)
    if not settings.owner_blocks:
        raise ValueError("--owner-blocks needs at least one K")
    if not (settings.baseline or settings.privacy or settings.dchi_ratios):
        raise ValueError("nothing to audit: drop --no-baseline or add --privacy / --dchi-ratios")
    if settings.public_prefix is not None:
        print(f"public prefix: the --dchi-ratios settings send the first {settings.public_prefix} position(s) "
              f"unprivatized (public={settings.public_prefix})", flush=True)
    print(TABLE_HEADER, flush=True)
    rows = run_audit(settings, report=lambda line: print(line, flush=True))
    print(recovery_note(rows), flush=True)
    note = targets_note(rows)
    if note:
        print(note, flush=True)
    write_json(rows, args.out / "audit.json", {"model": args.model, "steps": args.steps, "seed": args.seed})
    (args.out / "audit.md").write_text(table(rows))
    picture = plot(rows, args.out / "audit.png")
    print(f"written: {args.out / 'audit.json'}, {args.out / 'audit.md'}" + (f", {picture}" if picture else ""))
    return 0
