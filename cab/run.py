"""The `cab run` driver: config -> cells -> executor -> results store -> leaderboard.

Cells already in the store are skipped (resume is free: rerun the same command), each Result is stored
the moment it arrives, and an interrupted run is recorded as such with the command that resumes it.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import shlex
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from cab import provenance
from cab.cells import Cell, Result
from cab.config import Config, ConfigError, load_config
from cab.destinations import creation_problem
from cab.executors import Executor, accepted_options, get_executor
from cab.grid import expand
from cab.kinds import CELL_KINDS, describe
from cab.registry import PluginError
from cab.status import Status
from cab.store import SCHEMA_VERSION, ResultStore

RETRYABLE = (Status.ERROR, Status.TIMEOUT, Status.OOM)


@dataclass
class RunSummary:
    """What a grid run did: cells planned (the whole grid), skipped (already stored), run now, their
    statuses, the wall time, where the results and the leaderboard are."""

    config: str
    planned: int
    skipped: int
    run: int
    stale: int = 0  # cells rerun because their stored result measured other code versions
    counts: "dict[str, int]" = field(default_factory=dict)
    wall_s: float = 0.0
    db: "Path | None" = None
    report: "Path | None" = None
    run_id: str = ""
    note: str = ""  # why no leaderboard was rendered, when none was
    timeline: "Timeline | None" = None

    def __str__(self) -> str:
        statuses = ", ".join(f"{n} {s}" for s, n in sorted(self.counts.items(), key=lambda kv: -kv[1])) or "none"
        lines = [
            f"{self.config}: {self.planned} cells planned, {self.skipped} already done, {self.run} run "
            f"in {self.wall_s:.1f} s ({statuses})" + (f"; {self.stale} of them stale (other versions)"
                                                     if self.stale else ""),
            f"results: {self.db}",
        ]
        if self.report is not None:
            lines.append(f"leaderboard: {self.report}")
        if self.note:
            lines.append(self.note)
        if self.timeline is not None and self.run:
            lines += self.timeline.lines()
        return "\n".join(lines)


def select_cells(cells: "list[Cell]", store: ResultStore, *, force: bool = False,
                 retry_failed: bool = False) -> "list[Cell]":
    """The cells to run: all with `force`; otherwise those without a result, plus with `retry_failed`
    those whose result is an error, timeout or oom."""
    if force:
        return list(cells)
    done = store.finished_keys(c.key for c in cells)
    if retry_failed:
        done -= store.keys_with_status(RETRYABLE)
    return [c for c in cells if c.key not in done]


def _command(config_path: "str | Path", *, force: bool = False, retry_failed: bool = False,
             executor: "str | None" = None, address: "str | None" = None, workers: "int | None" = None,
             db: "str | Path | None" = None, report_dir: "str | Path | None" = None) -> str:
    """The `cab run` command line equivalent to a run_grid call."""
    args = ["cab", "run", str(config_path)]
    args += ["--force"] if force else []
    args += ["--retry-failed"] if retry_failed else []
    args += ["--executor", executor] if executor else []
    args += ["--address", address] if address else []
    args += ["--workers", str(workers)] if workers else []
    args += ["--db", str(db)] if db else []
    args += ["--out", str(report_dir)] if report_dir else []
    return shlex.join(args)


def _print_plugin_errors(errors: "list[PluginError]") -> None:
    for err in errors:
        print(f"cab: plugin failed to load: {err.source}\n{err.traceback.rstrip()}\n", file=sys.stderr)


def render_leaderboard(db_path: Path, out_dir: Path,
                       fidelity_budget_s: "float | None" = None) -> "tuple[Path | None, str]":
    """Render the report if cab.report is installed; (index path, "") or (None, why not). `fidelity_budget_s`:
    seconds for the report's fidelity measurements (None: the report's default; 0 leaves them out)."""
    try:
        report = importlib.import_module("cab.report")
    except ModuleNotFoundError as exc:
        if exc.name != "cab.report":
            raise
        report = None
    render = getattr(report, "render_report", None)
    if render is None:
        return None, "leaderboard not rendered: cab.report is not available in this checkout"
    report_error = getattr(report, "ReportError", None)
    try:
        budget = {} if fidelity_budget_s is None else {"fidelity_budget_s": fidelity_budget_s}
        return Path(render(db_path, out_dir, **budget)), ""
    except Exception as exc:
        if report_error is None or not isinstance(exc, report_error):
            raise
        return None, f"leaderboard not rendered: {exc}"


class OutputPathError(ValueError):
    """An output folder that cannot be created or written (found before any cell runs)."""


def check_output_dir(path: Path, option: str = "--out") -> None:
    """Refuse an output folder that is a file, lies under a file or in a folder that cannot be written:
    before any cell runs, not after the whole grid."""
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{option} {path} is a file, not a folder; give a folder for the leaderboard (or move "
                              "the file aside)")
    problem = creation_problem(path, path, option)
    if problem:
        raise OutputPathError(problem)


def _run_config(config: Config) -> dict:
    """Provenance of the run itself: the machine plus the resolved config."""
    return {**provenance.collect(config.device), "config_name": config.name,
            "config": config.model_dump(mode="json")}


@dataclass
class Timeline:
    """Where a run's time went: per cell kind, the cells, their summed seconds and the wall time from the
    first start to the last finish (shorter than the sum when cells ran side by side); the slowest cells;
    the seconds before the first cell (loading, expanding, starting the executor) and rendering the report."""

    kinds: "dict[str, list[float]]" = field(default_factory=dict)  # kind -> [cells, cell seconds, first, last]
    cells: "list[tuple[float, str]]" = field(default_factory=list)
    setup_s: float = 0.0
    report_s: float = 0.0
    SLOWEST = 10

    def started(self, cell: Cell, now: float) -> None:
        self.kinds.setdefault(cell.kind, [0, 0.0, now, now])

    def finished(self, result: Result, now: float) -> None:
        entry = self.kinds.setdefault(result.cell.kind, [0, 0.0, now, now])
        entry[0] += 1
        entry[1] += result.wall_s
        entry[3] = now
        self.cells.append((result.wall_s, f"{describe(result.cell)} ({result.status.value})"))

    def lines(self) -> "list[str]":
        phases = [f"{kind} {int(n)} cells {total:.1f} s over {last - first:.1f} s wall"
                  for kind, (n, total, first, last) in self.kinds.items()]
        head = f"time: start-up {self.setup_s:.1f} s; " + "; ".join(phases) + f"; leaderboard {self.report_s:.1f} s"
        slowest = sorted(self.cells, key=lambda c: -c[0])[:self.SLOWEST]
        return [head] + ([f"slowest cells: {', '.join(f'{name} {wall:.1f} s' for wall, name in slowest)}"]
                         if slowest else [])


class _Progress:
    """tqdm bar whose postfix names the running cell and the counts of statuses so far."""

    def __init__(self, total: int, name: str, enabled: bool):
        self.counts: Counter = Counter()
        self._bar = tqdm(total=total, disable=not enabled, unit="cell", desc=name, file=sys.stderr,
                         dynamic_ncols=True)

    def _show(self, cell: Cell) -> None:
        tally = " ".join(f"{s}={n}" for s, n in sorted(self.counts.items()))
        self._bar.set_postfix_str(f"{describe(cell)} | {tally}" if tally else describe(cell), refresh=False)

    def started(self, cell: Cell) -> None:
        self._show(cell)
        self._bar.refresh()

    def finished(self, result: Result) -> None:
        self.counts[result.status.value] += 1
        self._show(result.cell)
        self._bar.update(1)

    @property
    def done(self) -> int:
        return sum(self.counts.values())

    def close(self) -> None:
        self._bar.close()


def usable_cores() -> int:
    """The cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def bound_threads(config: Config, cells: "list[Cell]") -> "list[Cell]":
    """Cells whose `threads` is at most the usable cores (more threads than cores only slows a cell down
    and makes its timing meaningless); says so when the config asked for more."""
    cores = usable_cores()
    if config.threads is not None and config.threads > cores:
        print(f"cab: threads: {config.threads} is more than the {cores} cores this process may use; cells run with "
              f"{cores} threads", file=sys.stderr)
    return [dataclasses.replace(c, options={**c.options, "threads": cores})
            if isinstance(c.options.get("threads"), int) and c.options["threads"] > cores else c for c in cells]


def _executor(config: Config, kind: "str | None", address: "str | None", workers: "int | None",
              cells: "list[Cell] | tuple[Cell, ...]" = ()) -> Executor:
    """The executor of a run: the config's, or `kind`, `address` and `workers` from the command line. A pool
    runs at most cores / threads workers, threads being the most any cell that shares the machine asks for
    (conformance cells: one; cells that run alone, such as benchmarks, have every core to themselves), else
    the config's; more workers are refused with a message and the pool runs that many."""
    kind = kind or config.executor.kind
    options = {**config.executor.options(), **({"address": address} if address else {}),
               **({"workers": workers} if workers else {})}
    if kind == "pool":
        shared = [c.options["threads"] for c in cells
                  if isinstance(c.options.get("threads"), int) and not CELL_KINDS.get(c.kind).runs_alone]
        threads = min(max(shared, default=config.resolved_threads), usable_cores())
        most = max(1, usable_cores() // threads)
        asked = options.get("workers")
        if asked is not None and asked > most:
            print(f"cab: {asked} pool workers is more than the {usable_cores()} usable cores allow for cells of "
                  f"{threads} thread{'s' if threads > 1 else ''} each; the pool runs {most}", file=sys.stderr)
        options["workers"] = most if asked is None else min(asked, most)
    ignored = [name for name in ("memory_limit_bytes", "address", "workers")
               if options.get(name) is not None and name not in accepted_options(kind)]
    if ignored:
        print(f"cab: the {kind} executor does not use {' or '.join(ignored)} (set for this run); "
              "subprocess, pool and ray enforce memory limits, pool runs `workers` cells at once, ray connects "
              "to an address", file=sys.stderr)
    return get_executor(kind, timeout_s=config.executor.timeout_s, plugins=config.plugins, **options)


def run_grid(config_path: "str | Path", *, force: bool = False, retry_failed: bool = False,
             executor: "str | None" = None, address: "str | None" = None, workers: "int | None" = None,
             db: "str | Path | None" = None, report_dir: "str | Path | None" = None, render: bool = True,
             progress: bool = True, fidelity_budget_s: "float | None" = None) -> RunSummary:
    """Run every cell of a grid file that the store does not hold yet, storing each result as it arrives.

    `executor`, `address` and `workers` override the config's executor kind, Ray address and pool size. One
    run at a time writes a store: a second run on the same store stops with StoreBusy. On KeyboardInterrupt the run is
    recorded as 'interrupted', what is done and left and the command that resumes are printed to stderr,
    and the interrupt is re-raised (the CLI exits 130). `fidelity_budget_s` is the leaderboard's time for
    its fidelity measurements (None: the report's default; 0 leaves them out)."""
    t0 = time.perf_counter()
    config = load_config(config_path)
    _print_plugin_errors(config.plugin_errors)
    cells = bound_threads(config, expand(config))
    if not cells:
        raise ConfigError("the grid is empty: its sections plan no cell (every attention excluded, or no "
                          "pattern, mode or kv_heads value that applies)", source=str(config_path))
    db_path = Path(db or config.output.store)
    if render:  # an unusable --out is found now, not after the whole grid
        check_output_dir(Path(report_dir or config.output.report))
    command = _command(config_path, force=force, retry_failed=retry_failed, executor=executor, address=address,
                       workers=workers, db=db, report_dir=report_dir)
    with ResultStore(db_path) as store, store.writer_lock():
        todo = select_cells(cells, store, force=force, retry_failed=retry_failed)
        stale = store.stale_keys(todo)
        if stale:
            print(f"cab: {len(stale)} stored results measured other versions of their attention or task; "
                  "they are stale and run again", file=sys.stderr)
        if store.migrated_from is not None:
            print(f"cab: migrated {db_path} from store schema {store.migrated_from} to {SCHEMA_VERSION} "
                  f"(the file as it was: {store.backup})", file=sys.stderr)
        runner = _executor(config, executor, address, workers, todo)
        run_id = store.start_run(str(config_path), command, len(todo), _run_config(config), executor=runner.name)
        bar, state, timeline = _Progress(len(todo), config.name, progress), "failed", Timeline()
        timeline.setup_s = time.perf_counter() - t0

        def started(cell: Cell) -> None:
            timeline.started(cell, time.perf_counter())
            bar.started(cell)

        results = runner.run(todo, on_start=started)
        try:
            for result in results:
                store.put(result, run_id)
                bar.finished(result)
                timeline.finished(result, time.perf_counter())
            state = "finished"
        except KeyboardInterrupt:
            state = "interrupted"
            bar.close()
            resume = _command(config_path, retry_failed=retry_failed, executor=executor, address=address,
                              workers=workers, db=db, report_dir=report_dir)
            print(f"\ncab: interrupted after {bar.done} of {len(todo)} cells ({len(todo) - bar.done} left); "
                  f"every finished cell is stored in {db_path}.\ncab: resume with: {resume}", file=sys.stderr)
            raise
        finally:
            bar.close()
            results.close()  # stops what the executor still has queued or running
            runner.close()
            store.finish_run(run_id, bar.done, state)
    report, note, rendering = None, "", time.perf_counter()
    if render:
        report, note = render_leaderboard(db_path, Path(report_dir or config.output.report), fidelity_budget_s)
        if note:
            print(f"cab: {note}", file=sys.stderr)
    timeline.report_s = time.perf_counter() - rendering
    return RunSummary(config=str(config_path), planned=len(cells), skipped=len(cells) - len(todo), run=bar.done,
                      stale=len(stale),
                      counts=dict(bar.counts), wall_s=round(time.perf_counter() - t0, 2), db=db_path, report=report,
                      run_id=run_id, note=note, timeline=timeline)


__all__ = ["RETRYABLE", "OutputPathError", "RunSummary", "Timeline", "check_output_dir", "render_leaderboard",
           "run_grid", "select_cells"]
