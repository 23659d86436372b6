"""The child side of isolated cells: `child_main` runs one cell in a process forked from cab's forkserver;
`pool_worker_main` runs the cells a pool executor sends it, one after another, in such a process.

It leaves the parent's session (so the whole tree it starts can be killed as one group), sends its
output to two files (never to the driver's terminal: a plugin may print gigabytes), dies with its parent
(the forkserver) and lets go of the forkserver's "alive" pipe, so that the server exits when the driver
does (and takes its children with it, see cab.executors.serverguard), loads the plugins, runs the cell
and writes the Result as JSON atomically (temporary file + rename), so a process killed mid-write leaves
no half result. Exit status 0 with a result; EXIT_OOM after a MemoryError
that escaped the cell.
"""

from __future__ import annotations

import ctypes
import faulthandler
import json
import os
import signal
import sys
from pathlib import Path

EXIT_OOM = 3
_PR_SET_PDEATHSIG = 1
# set in the child from the submitting process at submission time: the server's copy may be stale
# (Ray assigns a GPU per task, after the server started)
DEVICE_ENV = ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES")


def device_env() -> "dict[str, str | None]":
    """The device-visibility variables of this process, to hand to a child."""
    return {name: os.environ.get(name) for name in DEVICE_ENV}


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent (the forkserver, which exits with the driver once
    no child holds its "alive" pipe: `_release_server`) dies, so a killed driver leaves no orphan measuring
    on a busy machine."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:
        os._exit(1)


def _release_server() -> None:
    """Close this process's copy of the forkserver's "alive" pipe (multiprocessing hands every child the
    driver's write end). CPython's server exits when every write end is closed; a child that kept one would
    keep the server, and with it itself (it dies with the server), alive after the driver died."""
    import multiprocessing.forkserver

    server = multiprocessing.forkserver._forkserver
    fd = getattr(server, "_forkserver_alive_fd", None)
    if fd is not None:
        server._forkserver_alive_fd = None  # a cell that uses a forkserver itself starts its own
        try:
            os.close(fd)
        except OSError:
            pass


def _redirect(fd: int, path: str, append: bool = False) -> None:
    mode = os.O_APPEND if append else os.O_TRUNC
    target = os.open(path, os.O_WRONLY | os.O_CREAT | mode, 0o600)
    os.dup2(target, fd)
    os.close(target)


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def _detach(stdout_path: str, stderr_path: str, env: "dict[str, str | None]", append: bool = False) -> None:
    """Leave the parent's session, send output to the two files, die with the parent, apply `env`."""
    os.setsid()
    _redirect(1, stdout_path, append)
    _redirect(2, stderr_path, append)
    stdin = os.open(os.devnull, os.O_RDONLY)
    os.dup2(stdin, 0)
    os.close(stdin)
    faulthandler.enable(file=sys.stderr)  # a segfault leaves its Python traceback in the stderr tail
    _die_with_parent()
    _release_server()  # after _die_with_parent: from now on the server's exit kills this process
    for name, value in (env or {}).items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def child_main(job: dict, result_path: str, stdout_path: str, stderr_path: str) -> None:
    """Run the job's cell in this (fresh) process and write its Result to `result_path`.

    `job`: cell (a Cell dict), plugins (specs to load), timeout_s (the soft limit), env (variables to
    set, None to unset)."""
    _detach(stdout_path, stderr_path, job.get("env") or {})
    try:
        _run(job, Path(result_path))
    except MemoryError:
        os._exit(EXIT_OOM)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def _load_plugins(plugins: "list[str]") -> list:
    from cab import registry

    errors = registry.discover(plugins or [])
    for err in errors:
        print(f"cab worker: plugin failed to load: {err.source}\n{err.traceback}", file=sys.stderr)
    return errors


def _run_one(cell: dict, timeout_s: "float | None", errors: list) -> dict:
    """Run one cell (a Cell dict); a failed cell's message names the plugins that failed to load."""
    from cab.cells import Cell
    from cab.runner import run_cell
    from cab.status import Status

    result = run_cell(Cell.from_dict(cell), timeout_s)
    if errors and result.status is Status.ERROR:
        result.message += "".join(f"\n\nplugin {e.source} failed to load: {e.message}" for e in errors)
    return result.to_dict()


def _run(job: dict, result_path: Path) -> None:
    errors = _load_plugins(job.get("plugins") or [])
    _write_atomically(result_path, json.dumps(_run_one(job["cell"], job.get("timeout_s"), errors)))


def pool_worker_main(conn, stdout_path: str, stderr_path: str, plugins: "list[str]",
                     env: "dict[str, str | None]") -> None:
    """A pool worker: receive jobs ({cell, timeout_s, default_threads}) on `conn` and send back each Result
    as a dict, until the parent sends None or goes away. Output is appended to the two files (the parent
    empties them before each job); exit status EXIT_OOM after a MemoryError that escaped a cell."""
    import torch

    _detach(stdout_path, stderr_path, env, append=True)
    errors = _load_plugins(plugins)
    try:
        while (job := conn.recv()) is not None:
            if job.get("default_threads"):  # a cell's own `threads` option wins (run_cell sets it)
                torch.set_num_threads(int(job["default_threads"]))
            payload = _run_one(job["cell"], job.get("timeout_s"), errors)
            sys.stdout.flush()
            sys.stderr.flush()
            conn.send(payload)
    except EOFError:
        return
    except MemoryError:
        os._exit(EXIT_OOM)
