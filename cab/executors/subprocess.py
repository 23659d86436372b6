"""Isolated cells: each runs in a fresh process (forked from cab's warm forkserver) in its own session.

The process writes its Result as JSON to a file (never stdout, which a plugin may flood); its stdout and
stderr go to files of which only the tail is read. While it runs, the parent watches it:
- time: past `timeout_s + grace_s` the whole process tree is killed -> `timeout` (the child applies the
  soft limit `timeout_s` itself, which gives a clean `timeout` Result for Python code);
- memory: the resident memory of the process tree is read from /proc every POLL_S; above
  `memory_limit_bytes` the tree is killed -> `oom` with the measured size;
- output: printing more than `max_output_bytes` gets the tree killed -> `error`.
A process killed by a signal is `error` with the signal's name. A SIGKILL that cab did not send is `oom`
only where there is evidence that the kernel's out-of-memory killer sent it: the machine's count of OOM
kills (`oom_kill` in /proc/vmstat, which counts cgroup-limit kills too) rose while the cell ran, or its
resident memory was last seen within 10% of `memory_limit_bytes`; otherwise it is `error`, killed from
outside cab, and the message says whether the OOM killer is ruled out or cannot be told. A MemoryError
that escaped the cell is `oom`.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from cab import provenance
from cab.cells import Cell, Result
from cab.check.gate import GATE_DIR_ENV
from cab.executors import forkserver, procfs
from cab.executors.base import CellCallback, Executor
from cab.status import Status
from cab.worker import EXIT_OOM, child_main, device_env

TAIL_CHARS = 4000
POLL_S = 0.05
DEFAULT_GRACE_S = 10.0
DEFAULT_MAX_OUTPUT_BYTES = 64 * 2**20
MiB = 2**20
NEAR_LIMIT = 0.9  # a SIGKILLed cell last seen above this fraction of its memory limit counts as oom


def oom_kills() -> "int | None":
    """How many processes the kernel's OOM killer has killed on this machine since boot (None: not known)."""
    try:
        with open("/proc/vmstat") as f:
            for line in f:
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


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


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _kill_tree(pid: int, running: bool) -> None:
    """SIGKILL the cell's session (anything it started that is still in it) and, while the cell process
    itself still runs, it and every descendant (also those that left the session). An exited cell's pid is
    not signalled again: it may belong to another process by now, unlike its group id, which the kernel
    does not reuse while the group has members."""
    if running:
        for target in reversed(procfs.tree(pid)):
            try:
                os.kill(target, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass(frozen=True)
class Limits:
    """What an isolated cell may use: seconds (None: no limit), start-up grace, resident bytes (None: no
    limit), printed bytes."""

    timeout_s: "float | None" = None
    grace_s: float = DEFAULT_GRACE_S
    memory_limit_bytes: "int | None" = None
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES

    @property
    def hard_limit_s(self) -> "float | None":
        return None if self.timeout_s is None else self.timeout_s + self.grace_s


@dataclass
class _Watch:
    """How the parent saw the cell end: the reason it killed it (None: it ended by itself), peak memory."""

    killed_for: "str | None" = None
    peak_rss_bytes: int = 0
    rss_at_kill: int = 0
    output_bytes: int = 0
    last_rss_bytes: int = 0
    oom_kills_at_start: "int | None" = field(default_factory=oom_kills)


def _watch(proc, limits: Limits, outputs: "tuple[Path, Path]") -> _Watch:
    """Wait for the cell process, killing its tree when it breaks a limit."""
    watch = _Watch()
    deadline = None if limits.hard_limit_s is None else time.monotonic() + limits.hard_limit_s
    while True:
        proc.join(POLL_S)
        if proc.exitcode is not None:
            return watch
        rss = procfs.tree_rss_bytes(proc.pid)
        watch.peak_rss_bytes, watch.last_rss_bytes = max(watch.peak_rss_bytes, rss), rss
        printed = sum(_size(p) for p in outputs)
        if limits.memory_limit_bytes is not None and rss > limits.memory_limit_bytes:
            watch.killed_for, watch.rss_at_kill = "memory", rss
        elif printed > limits.max_output_bytes:
            watch.killed_for, watch.output_bytes = "output", printed
        elif deadline is not None and time.monotonic() > deadline:
            watch.killed_for = "timeout"
        if watch.killed_for:
            return watch


def run_isolated(cell: Cell, *, plugins: Sequence[str] = (), limits: Limits = Limits(),
                 env: "dict[str, str] | None" = None) -> Result:
    """Run one cell in a fresh process under `limits` (with `env` added to its environment) and turn however
    it ended into a Result."""
    with tempfile.TemporaryDirectory(prefix="cab-cell-") as tmp:
        work = Path(tmp)
        result_path, stdout_path, stderr_path = work / "result.json", work / "stdout.txt", work / "stderr.txt"
        job = {"cell": cell.to_dict(), "plugins": list(plugins), "timeout_s": limits.timeout_s,
               "env": {**device_env(), **(env or {})}}
        started, t0 = _now(), time.perf_counter()
        proc = forkserver.start(child_main, (job, str(result_path), str(stdout_path), str(stderr_path)),
                                name=f"cab-cell-{cell.key}")
        try:
            watch = _watch(proc, limits, (stdout_path, stderr_path))
        finally:  # also on KeyboardInterrupt: nothing a cell started outlives it
            _kill_tree(proc.pid, running=proc.exitcode is None)
            proc.join()
        wall = round(time.perf_counter() - t0, 4)
        if watch.killed_for is None and result_path.is_file():
            result = Result.from_dict(json.loads(result_path.read_text()))
            result.cell = cell  # the exact cell submitted (same key), not its JSON round trip
            return result
        status, message, metrics = _failure(proc.exitcode, watch, limits, _tail(stderr_path))
        return Result(cell=cell, status=status, metrics=metrics, message=message,
                      provenance=provenance.collect(cell.device), wall_s=wall, started_at=started, finished_at=_now())


def _failure(exitcode: int, watch: _Watch, limits: Limits, stderr: str) -> "tuple[Status, str, dict]":
    """Status, message and metrics of a cell process that left no result (or was killed by the parent)."""
    tail = f"\n\nstderr (tail):\n{stderr}" if stderr.strip() else ""
    peak = {"peak_rss_bytes": watch.peak_rss_bytes} if watch.peak_rss_bytes else {}
    if watch.killed_for == "memory":
        return Status.OOM, (f"killed at {watch.rss_at_kill / MiB:,.0f} MiB resident, over the memory limit of "
                            f"{limits.memory_limit_bytes / MiB:,.0f} MiB{tail}"), {
            "rss_bytes": watch.rss_at_kill, "memory_limit_bytes": limits.memory_limit_bytes}
    if watch.killed_for == "output":
        return Status.ERROR, (f"killed after printing {watch.output_bytes / MiB:,.1f} MiB, over the output limit "
                              f"of {limits.max_output_bytes / MiB:,.1f} MiB{tail}"), {
            "output_bytes": watch.output_bytes}
    if watch.killed_for == "timeout":
        return Status.TIMEOUT, (f"killed after the hard time limit of {limits.hard_limit_s:g} s (timeout "
                                f"{limits.timeout_s:g} s + {limits.grace_s:g} s start-up grace){tail}"), peak
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        if -exitcode == signal.SIGKILL:
            return _outside_sigkill(watch, limits, tail, peak)
        return Status.ERROR, f"killed by signal {name}{tail}", peak
    if exitcode == EXIT_OOM:
        return Status.OOM, f"ran out of memory (MemoryError){tail}", peak
    if exitcode:
        return Status.ERROR, f"cell process exited with status {exitcode} without a result{tail}", peak
    return Status.ERROR, f"cell process exited without writing a result{tail}", peak


def _outside_sigkill(watch: _Watch, limits: Limits, tail: str, peak: dict) -> "tuple[Status, str, dict]":
    """A SIGKILL cab did not send: `oom` where the kernel's OOM killer is the likely sender, else `error`."""
    seen = f"{watch.last_rss_bytes / MiB:,.0f} MiB resident when last seen" if watch.last_rss_bytes else ""
    after = oom_kills()
    rose = None if watch.oom_kills_at_start is None or after is None else after - watch.oom_kills_at_start
    limit = limits.memory_limit_bytes
    if rose:
        return Status.OOM, (f"killed by SIGKILL while the kernel's out-of-memory killer was killing processes "
                            f"(/proc/vmstat oom_kill rose by {rose} during the cell{'; ' + seen if seen else ''})"
                            f"{tail}"), peak
    if limit is not None and watch.last_rss_bytes >= NEAR_LIMIT * limit:
        return Status.OOM, (f"killed by SIGKILL at {seen}, near the memory limit of {limit / MiB:,.0f} MiB "
                            f"(most likely an out-of-memory kill){tail}"), peak
    why = ("not by the kernel's out-of-memory killer: /proc/vmstat oom_kill did not change" if rose == 0 else
           "whether by the kernel's out-of-memory killer cannot be told here (no /proc/vmstat oom_kill)")
    return Status.ERROR, f"killed by SIGKILL from outside cab ({why}{'; ' + seen if seen else ''}){tail}", peak


class SubprocessExecutor(Executor):
    """One fresh process per cell: crashes, hangs, memory blow-ups and floods of output stay inside the
    cell. See the module docstring for the limits."""

    name = "subprocess"

    def __init__(self, *, timeout_s: "float | None" = None, plugins: Sequence[str] = (),
                 grace_s: float = DEFAULT_GRACE_S, memory_limit_bytes: "int | None" = None,
                 max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES):
        super().__init__(timeout_s=timeout_s, plugins=plugins)
        self.limits = Limits(timeout_s=timeout_s, grace_s=grace_s, memory_limit_bytes=memory_limit_bytes,
                             max_output_bytes=max_output_bytes)
        self._gates: "tempfile.TemporaryDirectory | None" = None

    def run(self, cells: Iterable[Cell], on_start: "CellCallback | None" = None) -> Iterator[Result]:
        if self._gates is None:  # the cells of this executor share correctness verdicts (cab.check.gate)
            self._gates = tempfile.TemporaryDirectory(prefix="cab-gates-")
        env = {GATE_DIR_ENV: self._gates.name}
        for cell in cells:
            if on_start is not None:
                on_start(cell)
            yield run_isolated(cell, plugins=self.plugins, limits=self.limits, env=env)

    def close(self) -> None:
        if self._gates is not None:
            self._gates.cleanup()
            self._gates = None
