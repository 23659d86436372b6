"""The forkserver isolated cells are forked from: a server process that has already imported torch and
cab, so that each cell gets a fresh process in a fraction of a second instead of paying several seconds
of imports (torch, and torch._dynamo, which torch loads on first use of several ops).

The server never runs torch code (no thread pools, no CUDA context), so forking it is safe; each child
is a fresh copy of it and shares nothing with earlier cells. multiprocessing keeps one forkserver per
process: `context()` makes sure it preloads WARM_MODULES, restarting a server that another user (e.g.
cab.bench.memory's probe) started without them.

The server and multiprocessing's resource tracker are started with their stdout on /dev/null, so that no
helper holds the driver's stdout (`cab run ... | tee log` sees the end of its input when the driver ends).
The server exits when the driver does: every child lets go of the server's "alive" pipe
(cab.worker._release_server), so the driver holds its only write end; the children die with the server
(PR_SET_PDEATHSIG), and the server kills their sessions on its way out (cab.executors.serverguard).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.context
import multiprocessing.forkserver
import os
import sys
import types
from typing import Callable, Iterator

WARM_MODULES = ("cab.executors.serverguard", "cab.executors.tqdm_lock", "torch", "torch._dynamo", "cab.runner",
                "cab.check", "cab.bench", "cab.bench.memory_probe", "cab.worker")


_started: "set[int]" = set()  # pids of servers started with WARM_MODULES


def context() -> multiprocessing.context.BaseContext:
    """The forkserver context, with WARM_MODULES (and whatever else was asked for) preloaded."""
    ctx = multiprocessing.get_context("forkserver")
    server = multiprocessing.forkserver._forkserver
    running = getattr(server, "_forkserver_pid", None)
    current = [m for m in getattr(server, "_preload_modules", []) if m != "__main__"]
    if running is not None and running not in _started and hasattr(server, "_stop"):
        server._stop()  # started by someone else, perhaps without our modules: the next start preloads them
    ctx.set_forkserver_preload(current + [m for m in WARM_MODULES if m not in current])
    return ctx


@contextlib.contextmanager
def _without_main_script() -> Iterator[None]:
    """Hide the driver's __main__ while multiprocessing records what a child must import first."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


@contextlib.contextmanager
def _stdout_to_devnull() -> Iterator[None]:
    """File descriptor 1 on /dev/null for the duration (for helper processes started meanwhile)."""
    try:
        saved = os.dup(1)
    except OSError:  # no stdout at all: nothing to hide
        yield
        return
    sys.stdout.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def _server_running() -> bool:
    pid = getattr(multiprocessing.forkserver._forkserver, "_forkserver_pid", None)
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except (OSError, TypeError):
        return pid is not None and not sys.platform.startswith("linux")
    return stat[stat.rindex(")") + 2] not in "ZX"


def start(target: Callable, args: tuple, name: str, daemon: bool = False) -> multiprocessing.process.BaseProcess:
    """Fork a child from the warm server that runs `target(*args)`; returns the started process (`daemon`:
    killed when this process exits)."""
    process = context().Process(target=target, args=args, name=name, daemon=daemon)
    with _without_main_script():
        if not _server_running():  # the server and resource tracker start now: not on the driver's stdout
            with _stdout_to_devnull():
                multiprocessing.forkserver.ensure_running()
        process.start()
    _started.add(multiprocessing.forkserver._forkserver._forkserver_pid)
    return process
