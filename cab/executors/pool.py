"""Pool executor: cells spread over `workers` long-lived worker processes, forked from cab's warm
forkserver, each running cells one after another.

A worker keeps what a process caches between cells (imports, a task's prepared data, the correctness gate
of each attention, whose verdicts the workers also share through a folder), so many short cells, such as
a task grid of small models, pay their start-up once per worker instead of once per cell. The parent
watches every busy worker with the subprocess executor's limits: a cell that passes
`timeout_s + grace_s`, whose worker holds more than `memory_limit_bytes` resident or prints more than
`max_output_bytes`, or whose worker dies (segfault, OOM killer) gets the status a `subprocess` cell would
get, its worker is killed and a fresh one replaces it, and the grid goes on. A worker's resident memory
includes what earlier cells left cached in it.

Cells of a kind registered with `runs_alone` (benchmarks: timings) each run alone, with every other
worker idle, so that no concurrent cell competes for cores or memory bandwidth while it is measured. A
cell that does not set `threads` gets the usable cores shared out among the workers, or all of them when
it runs alone.

Cells in one lane (their kind's `lane`, e.g. the conformance cells of an attention that compiles a kernel per
shape: cab.registry.compile_lane) run one at a time, each on the worker that ran the lane's last cell when
that worker is free: the four patterns of FlexAttention then compile their kernels once, in one process,
instead of on two workers at once. While a lane is busy its next cell waits and later cells go ahead.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from cab import provenance
from cab.cells import Cell, Result
from cab.check.gate import GATE_DIR_ENV
from cab.executors import forkserver, procfs
from cab.executors.base import CellCallback, Executor
from cab.executors.subprocess import (
    DEFAULT_GRACE_S,
    DEFAULT_MAX_OUTPUT_BYTES,
    POLL_S,
    Limits,
    _failure,
    _kill_tree,
    _now,
    _size,
    _tail,
    _Watch,
)
from cab.kinds import CELL_KINDS
from cab.worker import device_env, pool_worker_main

STOP_WAIT_S = 5.0  # how long an idle worker gets to exit by itself at the end of a run


def default_workers() -> int:
    """One worker per core this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def runs_alone(cell: Cell) -> bool:
    """True for cells whose kind must not share the machine with another cell (timings)."""
    return CELL_KINDS.get(cell.kind).runs_alone


def lane(cell: Cell) -> "str | None":
    """The lane its kind gives `cell` (cells of one lane run one at a time), or None."""
    kind = CELL_KINDS.get(cell.kind)
    return kind.lane(cell) if kind.lane is not None else None


@dataclass
class _Worker:
    """One worker process, its end of the pipe, its output files and the cell it is running (if any)."""

    process: object
    conn: Connection
    stdout: Path
    stderr: Path
    cell: "Cell | None" = None
    lane: "str | None" = None
    started_at: str = ""
    t0: float = 0.0
    watch: _Watch = field(default_factory=_Watch)

    @property
    def outputs(self) -> "tuple[Path, Path]":
        return self.stdout, self.stderr


class PoolExecutor(Executor):
    """Cells over `workers` warm worker processes (default: one per usable core), with the limits of the
    subprocess executor; see the module docstring."""

    name = "pool"

    def __init__(self, *, timeout_s: "float | None" = None, plugins: Sequence[str] = (),
                 workers: "int | None" = None, grace_s: float = DEFAULT_GRACE_S,
                 memory_limit_bytes: "int | None" = None, max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES):
        super().__init__(timeout_s=timeout_s, plugins=plugins)
        if workers is not None and workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.workers = workers or default_workers()
        self.limits = Limits(timeout_s=timeout_s, grace_s=grace_s, memory_limit_bytes=memory_limit_bytes,
                             max_output_bytes=max_output_bytes)
        self._pool: "list[_Worker]" = []
        self._lane_workers: "dict[str, _Worker]" = {}  # lane -> the worker that ran its last cell
        self._tmp: "tempfile.TemporaryDirectory | None" = None
        self._started = 0

    def run(self, cells: Iterable[Cell], on_start: "CellCallback | None" = None) -> Iterator[Result]:
        todo, waiting = iter(cells), []
        try:
            while True:
                self._assign(waiting, todo, on_start)
                busy = [w for w in self._pool if w.cell is not None]
                if not busy:
                    return
                yield from self._collect(busy)
        finally:  # finished, interrupted or abandoned: no worker outlives the run
            self._stop_all()

    def _assign(self, waiting: "list[Cell]", todo: Iterator[Cell], on_start: "CellCallback | None") -> None:
        """Give cells to idle workers while the rules allow, the cells in `waiting` first, in order; the
        cells that cannot start yet stay in `waiting`. A cell that runs alone waits for an idle pool and holds
        back every cell after it; a cell whose lane is busy waits for it while later cells go ahead."""
        position = 0
        while True:
            if position == len(waiting):
                cell = next(todo, None)
                if cell is None:
                    return
                waiting.append(cell)
            cell = waiting[position]
            busy = [w for w in self._pool if w.cell is not None]
            if busy and (runs_alone(cell) or any(runs_alone(w.cell) for w in busy)):
                return
            cell_lane = lane(cell)
            if cell_lane is not None and any(w.lane == cell_lane for w in busy):
                position += 1
                continue
            worker = self._idle_worker(cell_lane)
            if worker is None:
                return
            try:
                self._submit(worker, cell, cell_lane)
            except OSError:  # the idle worker died since the last look: the cell goes to another
                worker.cell = None
                self._discard(worker)
                continue
            waiting.pop(position)
            if on_start is not None:
                on_start(cell)

    def default_threads(self, cell: Cell) -> int:
        """CPU threads of a cell that does not set `threads`: every core for a cell that runs alone, else
        the cores shared out among the workers (so N workers do not each start a thread per core)."""
        cores = default_workers()
        return cores if runs_alone(cell) else max(1, cores // self.workers)

    def _idle_worker(self, cell_lane: "str | None" = None) -> "_Worker | None":
        """An idle live worker (the one that ran `cell_lane`'s last cell, when it is idle), a new one if the
        pool has room, else None; idle workers found dead (killed from outside between cells) leave the pool."""
        for worker in [w for w in self._pool if w.cell is None]:
            if worker.process.exitcode is not None:
                self._discard(worker)
        idle = [w for w in self._pool if w.cell is None]
        preferred = self._lane_workers.get(cell_lane) if cell_lane is not None else None
        if any(w is preferred for w in idle):
            return preferred
        if idle:
            return idle[0]
        return self._start_worker() if len(self._pool) < self.workers else None

    def _discard(self, worker: _Worker) -> None:
        self._pool.remove(worker)
        _kill_tree(worker.process.pid, running=worker.process.exitcode is None)
        worker.process.join()
        worker.conn.close()

    def _start_worker(self) -> _Worker:
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="cab-pool-")
        self._started += 1
        folder = Path(self._tmp.name)
        stdout, stderr = folder / f"worker{self._started}.out", folder / f"worker{self._started}.err"
        parent, child = forkserver.context().Pipe(duplex=True)
        env = {**device_env(), GATE_DIR_ENV: str(folder / "gates")}  # workers share correctness verdicts
        process = forkserver.start(pool_worker_main, (child, str(stdout), str(stderr), list(self.plugins), env),
                                   name=f"cab-pool-worker-{self._started}")
        child.close()
        worker = _Worker(process=process, conn=parent, stdout=stdout, stderr=stderr)
        self._pool.append(worker)
        return worker

    def _submit(self, worker: _Worker, cell: Cell, cell_lane: "str | None" = None) -> None:
        for path in worker.outputs:  # the worker is idle and appends: its files now hold this cell's output
            path.write_bytes(b"")
        worker.cell, worker.started_at, worker.t0, worker.watch = cell, _now(), time.monotonic(), _Watch()
        worker.lane = cell_lane
        if cell_lane is not None:
            self._lane_workers[cell_lane] = worker
        worker.conn.send({"cell": cell.to_dict(), "timeout_s": self.limits.timeout_s,
                          "default_threads": self.default_threads(cell)})

    def _collect(self, busy: "list[_Worker]") -> Iterator[Result]:
        """Wait up to POLL_S for results or dead workers, then check the limits of the others."""
        wait([w.conn for w in busy] + [w.process.sentinel for w in busy], timeout=POLL_S)
        for worker in busy:
            result = self._received(worker)
            if result is None and worker.process.exitcode is None:
                self._check_limits(worker)
                if worker.watch.killed_for is None:
                    continue
            yield result if result is not None else self._lost(worker)

    def _received(self, worker: _Worker) -> "Result | None":
        try:
            if not worker.conn.poll():
                return None
            payload = worker.conn.recv()
        except (EOFError, OSError):
            return None  # the worker died: its exit code says how
        result = Result.from_dict(payload)
        result.cell, worker.cell, worker.lane = worker.cell, None, None  # the exact cell submitted (same key)
        return result

    def _check_limits(self, worker: _Worker) -> None:
        limits, watch = self.limits, worker.watch
        rss = procfs.tree_rss_bytes(worker.process.pid)
        watch.peak_rss_bytes, watch.last_rss_bytes = max(watch.peak_rss_bytes, rss), rss
        printed = sum(_size(p) for p in worker.outputs)
        if limits.memory_limit_bytes is not None and rss > limits.memory_limit_bytes:
            watch.killed_for, watch.rss_at_kill = "memory", rss
        elif printed > limits.max_output_bytes:
            watch.killed_for, watch.output_bytes = "output", printed
        elif limits.hard_limit_s is not None and time.monotonic() - worker.t0 > limits.hard_limit_s:
            watch.killed_for = "timeout"

    def _lost(self, worker: _Worker) -> Result:
        """The Result of a cell whose worker died or broke a limit; the worker leaves the pool."""
        self._discard(worker)
        status, message, metrics = _failure(worker.process.exitcode, worker.watch, self.limits, _tail(worker.stderr))
        return Result(cell=worker.cell, status=status, metrics=metrics, message=message,
                      provenance=provenance.collect(worker.cell.device),
                      wall_s=round(time.monotonic() - worker.t0, 4), started_at=worker.started_at,
                      finished_at=_now())

    def _stop_all(self) -> None:
        """Idle workers are asked to exit (so they release what they hold, e.g. tqdm's semaphore); busy
        ones (an interrupted run) and any that does not exit in STOP_WAIT_S are killed."""
        for worker in self._pool:
            if worker.cell is None:
                try:
                    worker.conn.send(None)
                except OSError:
                    pass
        deadline = time.monotonic() + STOP_WAIT_S
        for worker in self._pool:
            if worker.cell is None:
                worker.process.join(max(0.0, deadline - time.monotonic()))
            _kill_tree(worker.process.pid, running=worker.process.exitcode is None)
            worker.process.join()
            worker.conn.close()
        self._pool.clear()

    def close(self) -> None:
        self._stop_all()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


__all__ = ["PoolExecutor", "default_workers", "runs_alone"]
