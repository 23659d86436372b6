"""Runs one cell in the current process and turns every outcome (exceptions, OOM, timeouts) into a Result."""

from __future__ import annotations

import datetime as _dt
import time

import torch

from cab import provenance
from cab.cells import Cell, Result, jsonable
from cab.failures import outcome_of_exception, time_limit
from cab.kinds import run_kind


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
            outcome = run_kind(cell)
    except (Exception, SystemExit) as exc:  # every failure of a cell is a status, never a crash or exit of cab
        outcome = outcome_of_exception(exc)
    return Result(
        cell=cell, status=outcome.status, metrics=jsonable(outcome.metrics), message=outcome.message,
        provenance=provenance.collect(cell.device), wall_s=round(time.perf_counter() - t0, 4),
        started_at=started, finished_at=_now(),
    )
