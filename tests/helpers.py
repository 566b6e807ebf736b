"""Shared test helpers (tests/ is on the path)."""
import json
import random
import sys
from pathlib import Path


ARCHITECTURES = ["tiny-llama", "tiny-gpt2"]
WORDS = "the cat sat on a mat and dog ran far away into green fields while birds sang".split()


def write_text_data(path: Path, records: int = 48, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(records):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14)))}) + "\n")
    return path


def ringtune_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "ringtune.cli", *args]
