"""How a cell fails: its time limit, out-of-memory errors, and the status any exception stands for.

Low-level on purpose: the checks, the benchmarks, the runner and the report all use these, and it imports
nothing of cab but the cell and status types."""

from __future__ import annotations

import contextlib
import signal
import threading
import traceback
from typing import Iterator

import torch

from cab.cells import Outcome
from cab.status import Status


class CellTimeout(Exception):
    """Raised inside a cell when its time limit passes."""


@contextlib.contextmanager
def time_limit(seconds: "float | None", repeat_s: float = 0.0) -> Iterator[None]:
    """Interrupt the block after `seconds` with CellTimeout (main thread on POSIX; elsewhere no limit), and
    again every `repeat_s` seconds when given, so that code which swallows the first (the Triton interpreter
    turns exceptions inside a kernel into its own) cannot keep the cell running.

    A signal cannot interrupt a long native call, only the Python code around it: use the subprocess
    executor for a hard limit."""
    usable = (
        seconds is not None and seconds > 0 and hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
    )
    if not usable:
        yield
        return

    def _expire(signum, frame):
        raise CellTimeout(f"cell exceeded its time limit of {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, _expire)
    signal.setitimer(signal.ITIMER_REAL, seconds, repeat_s)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def is_oom(exc: BaseException) -> bool:
    """True for out-of-memory errors from torch (CPU or CUDA) and Python."""
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text
                                              or "not enough memory" in text)


def outcome_of_exception(exc: BaseException) -> Outcome:
    """The status an exception raised by a cell stands for."""
    if isinstance(exc, CellTimeout):
        return Outcome(Status.TIMEOUT, message=str(exc))
    if isinstance(exc, SystemExit):
        return Outcome(Status.ERROR, message=f"SystemExit: sys.exit({exc.code!r}) was called inside the cell "
                                             "(an attention or task must raise, never exit the process)")
    if is_oom(exc):
        return Outcome(Status.OOM, message=f"{type(exc).__name__}: {str(exc)[:2000]}")
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return Outcome(Status.ERROR, message=f"{type(exc).__name__}: {exc}\n\n{''.join(tb)[-4000:]}")
