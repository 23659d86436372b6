"""Runs one cell in the current process and turns every outcome (exceptions, OOM, timeouts) into a Result."""

from __future__ import annotations

import contextlib
import datetime as _dt
import signal
import threading
import time
import traceback
from typing import Iterator

import torch

from cab import provenance
from cab.cells import Cell, Outcome, Result, jsonable
from cab.status import Status


class CellTimeout(Exception):
    """Raised inside a cell when its time limit passes."""


@contextlib.contextmanager
def time_limit(seconds: "float | None") -> Iterator[None]:
    """Interrupt the block after `seconds` with CellTimeout (main thread on POSIX; elsewhere no limit).

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
    signal.setitimer(signal.ITIMER_REAL, seconds)
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
    if is_oom(exc):
        return Outcome(Status.OOM, message=f"{type(exc).__name__}: {str(exc)[:2000]}")
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return Outcome(Status.ERROR, message=f"{type(exc).__name__}: {exc}\n\n{''.join(tb)[-4000:]}")


def _dispatch(cell: Cell) -> Outcome:
    if cell.kind == "check":
        from cab.check import check_cell

        return check_cell(cell)
    if cell.kind == "bench":
        from cab.bench import bench_cell

        return bench_cell(cell)
    if cell.kind == "task":
        from cab.training.cell import task_cell

        return task_cell(cell)
    raise ValueError(f"unknown cell kind {cell.kind!r}")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def run_cell(cell: Cell, timeout_s: "float | None" = None) -> Result:
    """Run `cell` here; never raises for a failure of the attention (KeyboardInterrupt still propagates)."""
    started, t0 = _now(), time.perf_counter()
    threads = cell.options.get("threads")
    if threads and cell.device == "cpu":
        torch.set_num_threads(int(threads))
    try:
        with time_limit(timeout_s):
            outcome = _dispatch(cell)
    except Exception as exc:  # every failure of a cell is a status, never a crash of cab
        outcome = outcome_of_exception(exc)
    return Result(
        cell=cell, status=outcome.status, metrics=jsonable(outcome.metrics), message=outcome.message,
        provenance=provenance.collect(cell.device), wall_s=round(time.perf_counter() - t0, 4),
        started_at=started, finished_at=_now(),
    )
