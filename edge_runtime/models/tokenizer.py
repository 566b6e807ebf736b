"""The small tokenizer interface the data owner needs, for HF tokenizers and the tiny models' bytes."""
from __future__ import annotations

import tempfile
from abc import ABC, abstractmethod
from pathlib import Path

import msgpack


class Tokenizer(ABC):
    eos_token_id: int
    pad_token_id: int

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of text, without special tokens."""

    @abstractmethod
    def decode(self, ids: list[int]) -> str:
        """Text of token ids, special tokens dropped."""


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens 0..255, then pad and eos: needs no files, for the tiny test models."""

    vocab_size = 258
    pad_token_id = 256
    eos_token_id = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer(Tokenizer):
    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)


def tokenizer_blob(tokenizer: Tokenizer) -> bytes:
    """The tokenizer as bytes for the data owner (a few MB of files for HF tokenizers)."""
    if isinstance(tokenizer, ByteTokenizer):
        return msgpack.packb({"kind": "bytes"})
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer._tokenizer.save_pretrained(tmp)
        files = {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}
    return msgpack.packb({"kind": "hf", "files": files})


def tokenizer_from_blob(blob: bytes) -> Tokenizer:
    spec = msgpack.unpackb(blob)
    if spec["kind"] == "bytes":
        return ByteTokenizer()
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        for name, data in spec["files"].items():
            (Path(tmp) / Path(name).name).write_bytes(data)
        return HFTokenizer(AutoTokenizer.from_pretrained(tmp, local_files_only=True))
