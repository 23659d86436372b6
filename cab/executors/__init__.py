"""Executors run cells and yield Results: `local` (in-process), `subprocess` (one isolated process per
cell, with time, memory and output limits), `pool` (warm worker processes running cells in parallel, with
the same limits) and `ray` (isolated cells as Ray tasks on a cluster).

The registry holds where each executor's class lives, so that naming or validating an executor (a config,
`cab run --help`) imports none of them; `executor_class` imports the one a run uses."""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Sequence

from cab.executors.base import Executor
from cab.registries import Registry, UnknownName


class UnknownExecutor(UnknownName, ValueError):
    """An executor kind that is not registered (a ValueError too: it is a bad option value)."""

    def __init__(self, name: str, known: "list[str]"):
        super().__init__("executor", name, known, hint=f"executors: {', '.join(known)}")


EXECUTORS: "Registry[str]" = Registry("executor", unknown=UnknownExecutor)
for _name, _where in (("local", "cab.executors.local:LocalExecutor"),
                      ("subprocess", "cab.executors.subprocess:SubprocessExecutor"),
                      ("pool", "cab.executors.pool:PoolExecutor"), ("ray", "cab.executors.ray:RayExecutor")):
    EXECUTORS.add(_name, _where)


def executor_class(kind: str) -> "type[Executor]":
    """The class of the executor named `kind` (imported now); raises UnknownName with near matches."""
    module, _, attribute = EXECUTORS.get(kind).partition(":")
    return getattr(importlib.import_module(module), attribute)


def accepted_options(kind: str) -> "set[str]":
    """The keyword options the executor `kind` takes besides timeout_s and plugins."""
    parameters = inspect.signature(executor_class(kind).__init__).parameters
    return {name for name in parameters if name not in ("self", "timeout_s", "plugins")}


def get_executor(kind: str, *, timeout_s: "float | None" = None, plugins: Sequence[str] = (),
                 **options: Any) -> Executor:
    """Build the executor named `kind`; of `options` (e.g. memory_limit_bytes, address) it gets those its
    constructor takes, so one set of config options serves every kind."""
    accepted = accepted_options(kind)
    return executor_class(kind)(timeout_s=timeout_s, plugins=plugins,
                                **{k: v for k, v in options.items() if k in accepted})


__all__ = ["EXECUTORS", "Executor", "UnknownExecutor", "accepted_options", "executor_class", "get_executor"]
