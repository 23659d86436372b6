"""Runs one check so that whatever it raises becomes that check's status, never a crash of cab.

An exception (or a plugin's sys.exit) is `error` (with its text), running out of memory is `oom`; the
runner's `CellTimeout` is re-raised so that the per-cell time limit still stops the whole cell."""

from __future__ import annotations

from typing import Callable

from cab.check.outcomes import CheckOutcome
from cab.failures import CellTimeout, is_oom, outcome_of_exception
from cab.status import Status


def isolated(name: str, check: Callable[[], CheckOutcome]) -> CheckOutcome:
    """`check()`, or the outcome its exception stands for."""
    try:
        return check()
    except CellTimeout:
        raise
    except SystemExit as exc:  # a plugin's sys.exit() is its check's error, not cab's exit
        return CheckOutcome(name, Status.ERROR, message=outcome_of_exception(exc).message)
    except Exception as exc:
        status = Status.OOM if is_oom(exc) else Status.ERROR
        text = " ".join(str(exc).split())
        return CheckOutcome(name, status, message=f"{type(exc).__name__}: {text[:1000]}")
