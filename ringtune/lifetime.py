"""Child processes that end with the process that started them.

`ringtune train --local N` starts its agents, and an ExecuTorch export its lowering workers, as child
processes. A coordinator killed with SIGKILL (or OOM-killed) cannot stop them, and an orphaned worker
kept a core busy for an hour. On Linux the kernel sends a child SIGTERM when its parent dies
(``PR_SET_PDEATHSIG``); elsewhere children are only stopped by an orderly exit.
"""
from __future__ import annotations

import ctypes
import signal
import sys

PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
# Resolved here, in the parent: a Popen preexec_fn runs between fork and exec, where loading a library could
# deadlock on a lock another thread held at the fork.


def end_with_parent() -> None:
    """Ask for SIGTERM when the parent dies (a Popen ``preexec_fn`` or a pool ``initializer``). The parent is
    the thread that started this process: start children from a thread that lives as long as they should."""
    if _LIBC is None:
        return
    if _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
