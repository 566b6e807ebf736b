"""Cost tables cached on disk: same table as tracing, keyed by everything tracing depends on."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.planning import table_cache
from coordinator.planning.cost_table import model_cost_table
from coordinator.planning.table_cache import cached_cost_table, cost_tables_dir, table_key
from ringtune.lora_spec import LoraSpec

LLAMA_7B = Path(__file__).parent / "data" / "llama-2-7b" / "config.json"


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RINGTUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_cached_table_is_the_traced_table():
    traced = model_cost_table("tiny-gpt2", LoraSpec(r=4), seq_len=16)
    first = cached_cost_table("tiny-gpt2", LoraSpec(r=4), seq_len=16)
    assert len(list(cost_tables_dir().glob("*.json"))) == 1
    again = cached_cost_table("tiny-gpt2", LoraSpec(r=4), seq_len=16)
    assert first == traced and again == traced


def test_a_config_file_is_read_once_and_named_by_its_directory():
    table = cached_cost_table(LLAMA_7B, seq_len=32)
    assert table.model == str(LLAMA_7B.parent) and table.num_blocks == 32
    assert cached_cost_table(LLAMA_7B, seq_len=32, name="llama") == \
        model_cost_table(LLAMA_7B.parent.as_posix(), seq_len=32, name="llama")


def test_the_key_changes_with_every_input(monkeypatch):
    config = json.loads(LLAMA_7B.read_text())
    base = table_key(config, LoraSpec(), 64)
    assert table_key(dict(config), LoraSpec(), 64) == base
    assert table_key({**config, "num_hidden_layers": 31}, LoraSpec(), 64) != base
    assert table_key(config, LoraSpec(r=16), 64) != base
    assert table_key(config, LoraSpec(target_modules=("q_proj",)), 64) != base
    assert table_key(config, LoraSpec(), 128) != base
    monkeypatch.setattr(table_cache, "FORMAT", table_cache.FORMAT + 1)
    assert table_key(config, LoraSpec(), 64) != base


def test_the_fingerprint_follows_the_tracing_code(tmp_path, monkeypatch):
    root = tmp_path / "src"
    for entry in table_cache.TRACING_CODE:
        target = root / entry
        if entry.endswith(".py"):
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("x = 1\n")
        else:
            target.mkdir(parents=True)
            (target / "module.py").write_text("y = 1\n")
    monkeypatch.setattr(table_cache, "_source_root", lambda: root)
    table_cache.code_fingerprint.cache_clear()
    before = table_cache.code_fingerprint()
    (root / "edge_runtime" / "models" / "module.py").write_text("y = 2\n")
    table_cache.code_fingerprint.cache_clear()
    assert table_cache.code_fingerprint() != before
    table_cache.code_fingerprint.cache_clear()


def test_an_unreadable_entry_is_traced_again():
    table = cached_cost_table("tiny-llama", seq_len=16)
    [entry] = cost_tables_dir().glob("*.json")
    entry.write_text("{not json")
    assert cached_cost_table("tiny-llama", seq_len=16) == table
    assert json.loads(entry.read_text())["seq_len"] == 16


@pytest.mark.slow
def test_plan_from_a_cached_table_starts_without_torch(cache):
    script = ("import sys; from ringtune.cli import main; "
              f"main(['plan', '--model-config', {str(LLAMA_7B)!r}, '--device', 'rpi5-8gb:a', "
              "'--device', 'rpi5-8gb:b', '--device', 'rpi5-8gb:c', '--json']); "
              "print('torch imported:', 'torch' in sys.modules)")
    runs = [subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
            for _ in range(2)]
    assert all(run.returncode == 0 for run in runs), runs[0].stderr + runs[1].stderr
    assert runs[0].stderr == runs[1].stderr == ""  # no library noise while tracing either
    assert runs[0].stdout.endswith("torch imported: True\n")  # traced
    assert runs[1].stdout.endswith("torch imported: False\n")  # read from the cache
    assert runs[0].stdout == runs[1].stdout.replace("False", "True")  # the same plan
