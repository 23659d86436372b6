"""Preloaded by cab's forkserver (cab.executors.forkserver) and active only there: when the server exits
(the driver that started it has died or closed it), it SIGKILLs the session of every child it forked
that still runs, so that nothing a cell started outlives the driver.

The children die with the server in any case (cab.worker sets PR_SET_PDEATHSIG relative to it); their
sessions hold what a cell started itself (a compiler, a data loader's workers). Imported anywhere else,
this module does nothing.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys


def in_forkserver() -> bool:
    """True while this module is imported by multiprocessing.forkserver.main (the server's preload)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "main" and frame.f_globals.get("__name__") == "multiprocessing.forkserver":
            return True
        frame = frame.f_back
    return False


def _children(pid: int) -> "list[int]":
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except (OSError, ValueError):
        return []


def kill_children_sessions(server_pid: int) -> None:
    """SIGKILL the session (process group) of each child of this server, and the child itself."""
    if os.getpid() != server_pid:  # a forked copy that exits (a cell's own fork): not the server
        return
    for child in _children(server_pid):
        for kill, target in ((os.killpg, child), (os.kill, child)):
            try:
                kill(target, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


if in_forkserver():
    atexit.register(kill_children_sessions, os.getpid())
