"""Executors run cells and yield Results: `local` (in-process), `subprocess` (one isolated process per
cell, with time, memory and output limits), `pool` (warm worker processes running cells in parallel, with
the same limits) and `ray` (isolated cells as Ray tasks on a cluster)."""

from __future__ import annotations

import difflib
import inspect
from typing import Any, Sequence

from cab.executors.base import Executor
from cab.executors.local import LocalExecutor
from cab.executors.pool import PoolExecutor
from cab.executors.ray import RayExecutor
from cab.executors.subprocess import SubprocessExecutor

EXECUTORS: "dict[str, type[Executor]]" = {"local": LocalExecutor, "subprocess": SubprocessExecutor,
                                           "pool": PoolExecutor, "ray": RayExecutor}


def accepted_options(kind: str) -> "set[str]":
    """The keyword options the executor `kind` takes besides timeout_s and plugins."""
    parameters = inspect.signature(EXECUTORS[kind].__init__).parameters
    return {name for name in parameters if name not in ("self", "timeout_s", "plugins")}


def get_executor(kind: str, *, timeout_s: "float | None" = None, plugins: Sequence[str] = (),
                 **options: Any) -> Executor:
    """Build the executor named `kind`; of `options` (e.g. memory_limit_bytes, address) it gets those its
    constructor takes, so one set of config options serves every kind."""
    try:
        cls = EXECUTORS[kind]
    except KeyError:
        near = difflib.get_close_matches(str(kind), list(EXECUTORS), n=1, cutoff=0.5)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ValueError(f"unknown executor {kind!r}{hint} (executors: {', '.join(EXECUTORS)})") from None
    accepted = accepted_options(kind)
    return cls(timeout_s=timeout_s, plugins=plugins, **{k: v for k, v in options.items() if k in accepted})


__all__ = ["EXECUTORS", "Executor", "LocalExecutor", "PoolExecutor", "RayExecutor", "SubprocessExecutor", "accepted_options",
           "get_executor"]
