"""DataLoader workers that end with the process that started them.

A worker whose parent is SIGKILLed (an OOM kill, a preempted cron job) can block forever on the pipe
to it, keeping its memory; the kernel ends it instead when it was asked to (Linux `PR_SET_PDEATHSIG`).
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import sys
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1


def _die_with(parent: int, worker_id: int) -> None:
    if not sys.platform.startswith("linux"):
        return  # elsewhere DataLoader's own watchdog is all there is
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        return
    if os.getppid() != parent:  # the parent died before the request was in place
        os._exit(1)


def die_with_parent() -> Callable[[int], None]:
    """A DataLoader `worker_init_fn` (create it in the process that iterates the loader): each worker
    is killed by the kernel when that process dies."""
    return functools.partial(_die_with, os.getpid())
