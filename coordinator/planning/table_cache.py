"""Traced cost tables kept on disk, so planning a known config needs neither tracing nor torch.

Tracing a table builds the model on the meta device with torch, transformers and peft (their
imports alone take seconds); the table is a pure function of the config, the LoRA spec, the
sequence length, the base dtype and the code that traces it. The key hashes them all: the config's
JSON, the spec, ``seq_len``, the base dtype, ``FORMAT``, the source of the tracing code (``coordinator/planning`` and
``edge_runtime/models``) and the installed torch, transformers and peft versions, so any change to
how tables are traced or priced misses the cache instead of reading a stale table. Entries live
in ``$RINGTUNE_CACHE/cost_tables/KEY.json`` (deleting the folder is always safe).
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import os
from functools import cache
from pathlib import Path
from typing import Any

from coordinator.planning.costs import CostTable, EndCost
from edge_runtime.checkpoint_store import write_atomic
from ringtune.lora_spec import LoraSpec

FORMAT = 1
"""Bump when the stored layout changes in a way the field names do not show."""
TRACING_CODE = ("coordinator/planning", "edge_runtime/models", "ringtune/lora_spec.py")
"""Source whose every byte goes into the key (relative to the repository or site-packages root)."""
LIBRARIES = ("torch", "transformers", "peft")
"""Installed versions that go into the key: tracing runs their modules."""
log = logging.getLogger(__name__)


def cost_tables_dir() -> Path:
    return Path(os.environ.get("RINGTUNE_CACHE", Path.home() / ".cache" / "ringtune")) / "cost_tables"


def cached_cost_table(model: str | Path | Any, lora: LoraSpec = LoraSpec(), seq_len: int = 64,
                      name: str | None = None, base_dtype: str = "fp32") -> CostTable:
    """``model_cost_table`` for a built-in name, a model directory, a config.json path or a config object,
    read from the cache when the same config was traced before by the same code."""
    config = _config_dict(model)
    key = table_key(config, lora, seq_len, base_dtype)
    table = load_table(key)
    if table is None:
        from coordinator.planning.cost_table import config_from_file, model_cost_table

        traced = config_from_file(model) if isinstance(model, Path) else model
        table = model_cost_table(traced, lora, seq_len, base_dtype=base_dtype)
        store_table(key, table)
    return dataclasses.replace(table, model=name or _default_name(model, config))


def table_key(config: dict, lora: LoraSpec, seq_len: int, base_dtype: str = "fp32") -> str:
    """What a traced table depends on, hashed."""
    inputs = {"format": FORMAT, "config": config, "lora": lora.to_dict(), "seq_len": seq_len,
              "base_dtype": base_dtype, "code": code_fingerprint()}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:32]


@cache
def code_fingerprint() -> str:
    """sha256 over the tracing code's source files and the traced libraries' versions."""
    root = _source_root()
    digest = hashlib.sha256()
    for entry in TRACING_CODE:
        path = root / entry
        for source in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(str(source.relative_to(root)).encode() + b"\0" + source.read_bytes() + b"\0")
    for library in LIBRARIES:
        digest.update(f"{library}=={_version(library)}\0".encode())
    return digest.hexdigest()


def _source_root() -> Path:
    """The folder holding the ringtune packages (the repository, or site-packages)."""
    return Path(__file__).resolve().parents[2]


def load_table(key: str) -> CostTable | None:
    """The stored table, or None if there is none or it cannot be read (then it is traced again)."""
    path = cost_tables_dir() / f"{key}.json"
    try:
        data = json.loads(path.read_text())
        return CostTable(**{f.name: _decode(data[f.name]) for f in dataclasses.fields(CostTable)})
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as error:
        log.warning("ignoring the unreadable cost table cache entry %s (%s): tracing again", path, error)
        return None


def store_table(key: str, table: CostTable) -> None:
    directory = cost_tables_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        write_atomic(directory / f"{key}.json", json.dumps(dataclasses.asdict(table)).encode())
    except OSError as error:  # a read-only cache only costs the next run a trace
        log.warning("cannot cache the cost table in %s (%s)", directory, error)


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        return EndCost(**value)
    return tuple(value) if isinstance(value, list) else value


def _config_dict(model: str | Path | Any) -> dict:
    """The config as plain JSON data, read without transformers where the config is a file."""
    if isinstance(model, Path):
        return _read_json(model)
    if isinstance(model, str):
        path = Path(model).expanduser() / "config.json"
        # A built-in name stands for its config: the registry's source is in the fingerprint.
        return _read_json(path) if path.is_file() else {"builtin": model}
    return model.to_dict()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        # config_from_file says what is wrong with it; an unreadable file is never cached.
        from coordinator.planning.cost_table import config_from_file

        config_from_file(path)
        raise


def _default_name(model: str | Path | Any, config: dict) -> str:
    if isinstance(model, Path):
        return str(model.parent if model.name == "config.json" else model)
    if isinstance(model, str):
        return model
    return config.get("_name_or_path") or config.get("model_type", "model")


def _version(library: str) -> str:
    try:
        return importlib.metadata.version(library)
    except importlib.metadata.PackageNotFoundError:
        return "absent"
