"""Known-harmless library warnings, silenced where they are raised; ringtune's own stay visible.

Each entry names the library and the exact message. Called by the CLI before anything imports
torch, and by every worker process ringtune spawns (a pool's initializer), which
otherwise start with Python's default filters.
"""
from __future__ import annotations

import logging
import os
import re
import warnings

HARMLESS_WARNINGS = (
    # peft calls a transformers API deprecated in v5 (is_gradient_checkpointing) on every LoRA wrap.
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
    # torch.export's own pytree code, while ExecuTorch lowers a program.
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
    # peft, about GPT-2's Conv1D layers: it sets fan_in_fan_out itself.
    (UserWarning, r".*fan_in_fan_out"),
)
"""(category, message regex) of library warnings a ringtune user can do nothing about."""
HARMLESS_LOGS = {
    # torchao's wheel ships CUDA kernels (_C_mxfp8, _C_cutlass_90a): they cannot load on a CPU.
    "torchao": re.compile(r"Failed to load .*_C_\w*\..*so"),
    # torchao's int8 matmul kernels have a triton (GPU) variant; CPU-only torch has no triton.
    "torchao.kernel.intmm": re.compile(r"Warning: Detected no triton"),
    # torchao registers Enums with torch's pytree, which torch 2.13 deprecates.
    "torch.utils._pytree": re.compile(r".* is an Enum subclass and is now natively supported"),
}
"""Logger name -> message of records from library loggers a ringtune user can do nothing about."""


class _DropMatching(logging.Filter):
    def __init__(self, pattern: re.Pattern) -> None:
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


def quiet_libraries() -> None:
    """Install the filters (idempotent), and turn off the Hugging Face progress bars and hub."""
    for category, message in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, pattern in HARMLESS_LOGS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMatching) for f in logger.filters):
            logger.addFilter(_DropMatching(pattern))
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
