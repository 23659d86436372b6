"""Executors run cells and yield Results: `local` (in-process) and `subprocess` (one isolated worker
process per cell, hard timeout). A distributed executor registers in `EXECUTORS` beside them."""

from __future__ import annotations

import difflib
from typing import Any, Sequence

from cab.executors.base import Executor
from cab.executors.local import LocalExecutor
from cab.executors.subprocess import SubprocessExecutor

EXECUTORS: "dict[str, type[Executor]]" = {"local": LocalExecutor, "subprocess": SubprocessExecutor}


def get_executor(kind: str, *, timeout_s: "float | None" = None, plugins: Sequence[str] = (),
                 **options: Any) -> Executor:
    """Build the executor named `kind`; `options` go to its constructor (e.g. grace_s for subprocess)."""
    try:
        cls = EXECUTORS[kind]
    except KeyError:
        near = difflib.get_close_matches(str(kind), list(EXECUTORS), n=1, cutoff=0.5)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ValueError(f"unknown executor {kind!r}{hint} (executors: {', '.join(EXECUTORS)})") from None
    return cls(timeout_s=timeout_s, plugins=plugins, **options)


__all__ = ["EXECUTORS", "Executor", "LocalExecutor", "SubprocessExecutor", "get_executor"]
