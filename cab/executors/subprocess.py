"""Isolated executor: each cell runs in a fresh `python -m cab.worker` process in its own process group.

The worker writes its Result as JSON to a file named on its command line (never stdout, which a plugin
may flood); its stdout and stderr go to files of which only the tail is read. The time limit is hard:
past it the whole process group is killed and the cell's status is `timeout`. A worker killed by a
signal is `error` with the signal's name, except SIGKILL without a timeout (the kernel's OOM killer) and
a MemoryError, which are `oom`.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from cab import provenance
from cab.cells import Cell, Result
from cab.executors.base import CellCallback, Executor
from cab.status import Status
from cab.worker import EXIT_OOM

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
TAIL_CHARS = 4000


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _tail(path: Path, limit: int = TAIL_CHARS) -> str:
    """The last `limit` characters of a (possibly huge) captured output file."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - limit))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return ("[...]" + text) if size > limit else text


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the worker's process group (the worker and anything it started), then reap the worker."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


class SubprocessExecutor(Executor):
    """One fresh worker process per cell: crashes, hangs and memory blow-ups stay inside the cell.

    The hard limit is `timeout_s + grace_s`: the worker applies the soft limit `timeout_s` itself (a
    clean `timeout` Result for Python code), and `grace_s` covers interpreter start-up and imports."""

    name = "subprocess"

    def __init__(self, *, timeout_s: "float | None" = None, plugins: Sequence[str] = (), grace_s: float = 10.0):
        super().__init__(timeout_s=timeout_s, plugins=plugins)
        self.grace_s = grace_s

    @property
    def hard_limit_s(self) -> "float | None":
        return None if self.timeout_s is None else self.timeout_s + self.grace_s

    def run(self, cells: Iterable[Cell], on_start: "CellCallback | None" = None) -> Iterator[Result]:
        for cell in cells:
            if on_start is not None:
                on_start(cell)
            yield self.run_one(cell)

    def run_one(self, cell: Cell) -> Result:
        """Run one cell in a fresh worker and turn however it ended into a Result."""
        with tempfile.TemporaryDirectory(prefix="cab-cell-") as tmp:
            work = Path(tmp)
            job, result_path = work / "job.json", work / "result.json"
            stdout_path, stderr_path = work / "stdout.txt", work / "stderr.txt"
            job.write_text(json.dumps({"cell": cell.to_dict(), "plugins": self.plugins,
                                       "timeout_s": self.timeout_s, "parent_pid": os.getpid()}))
            env = dict(os.environ, PYTHONFAULTHANDLER="1",
                       PYTHONPATH=os.pathsep.join(p for p in (_PACKAGE_ROOT, os.environ.get("PYTHONPATH")) if p))
            started, t0 = _now(), time.perf_counter()
            with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "cab.worker", str(job), str(result_path)],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env, start_new_session=True,
                )
                timed_out = False
                try:
                    proc.wait(timeout=self.hard_limit_s)
                except subprocess.TimeoutExpired:
                    timed_out = True
                finally:
                    _kill_group(proc)  # the worker on timeout or interrupt; stray children otherwise
            wall = round(time.perf_counter() - t0, 4)
            if result_path.is_file() and not timed_out:
                result = Result.from_dict(json.loads(result_path.read_text()))
                result.cell = cell  # the exact cell submitted (same key), not its JSON round trip
                return result
            status, message = self._failure(proc.returncode, timed_out, _tail(stderr_path))
            return Result(cell=cell, status=status, message=message, provenance=provenance.collect(cell.device),
                          wall_s=wall, started_at=started, finished_at=_now())

    def _failure(self, returncode: int, timed_out: bool, stderr: str) -> "tuple[Status, str]":
        """Status and message of a worker that left no result."""
        tail = f"\n\nstderr (tail):\n{stderr}" if stderr.strip() else ""
        if timed_out:
            return Status.TIMEOUT, (f"killed after the hard time limit of {self.hard_limit_s:g} s "
                                    f"(timeout {self.timeout_s:g} s + {self.grace_s:g} s start-up grace){tail}")
        if returncode < 0:
            name = signal.Signals(-returncode).name
            if -returncode == signal.SIGKILL:
                return Status.OOM, f"worker killed by {name} (most likely the kernel's out-of-memory killer){tail}"
            return Status.ERROR, f"worker killed by signal {name}{tail}"
        if returncode == EXIT_OOM:
            return Status.OOM, f"worker ran out of memory (MemoryError){tail}"
        if returncode != 0:
            return Status.ERROR, f"worker exited with status {returncode} without a result{tail}"
        return Status.ERROR, f"worker exited without writing a result{tail}"
