"""The fidelity section: approximation error against exact softmax attention (random and structured inputs)
and numeric deviation of the output per dtype against float64 (cab.analysis.fidelity).

The store holds no fidelity results, so this is the one part of the report that runs attentions: at a
tiny fixed shape on CPU, with default hyper-parameters, for the registered attentions and patterns that
pass their conformance checks in the store, within a time budget (breadth first: every pair gets its
approximation error before any gets its deviation). What the budget did not reach is shown as not
measured, never as 0.

The measurements run isolated, in a process forked from cab's warm forkserver (cab.executors.forkserver)
that loads the same plugins: the attentions are plugin code, and one that passed its isolated cells may
still segfault, exit or hang in C here. That process reports each measurement as it starts and ends (a
line of JSON in a file); the driver kills it past the budget plus HARD_GRACE_S, and a measurement during
which it died is a row note ("could not run: killed by SIGSEGV"); the rest go on in a fresh process
while budget is left. The report is always written."""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

from cab.report.support import PATTERNS

DEFAULT_BUDGET_S = 3.0  # what the report spends by default; `cab run/report --fidelity-budget` set it
HARD_GRACE_S = 2.0  # past the budget (whose soft limit stops Python code), the measuring process is killed
STARTUP_S = 120.0  # the measuring process may take this long to start (a cold forkserver imports torch)
SHAPE_TEXT = "B=1 H=2 L=32 D=16, float64 (approximation), seed 0, default hyper-parameters, CPU"


@dataclass
class FidelityRow:
    attention: str
    pattern: str
    random: "float | None" = None
    structured: "float | None" = None
    ran_in: str = ""
    deviation: dict = field(default_factory=dict)  # dtype -> (error, eager error)
    note: str = ""


@dataclass(frozen=True)
class Fidelity:
    rows: tuple
    dtypes: tuple
    budget_s: float
    elapsed_s: float
    complete: bool
    frame: pd.DataFrame


def _message(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"


_ROW_FIELDS = ("random", "structured", "ran_in", "deviation", "note")


def _ordered(pairs: "list[tuple[str, str]]") -> "tuple[list[FidelityRow], list[tuple[int, str]]]":
    """The rows in display order, and the steps (row index, "approx" | "deviate") in measuring order: every
    attention's first pattern gets both measurements before any second pattern gets one (breadth first)."""
    order = {p: i for i, p in enumerate(PATTERNS)}
    rows = [FidelityRow(a, p) for a, p in sorted(pairs, key=lambda x: (x[0].casefold(), order.get(x[1], 9)))]
    seen: dict[str, int] = {}
    rank = []
    for row in rows:
        rank.append(seen.get(row.attention, 0))
        seen[row.attention] = rank[-1] + 1
    steps = []
    for first in (True, False):
        group = sorted((i for i in range(len(rows)) if (rank[i] == 0) == first), key=lambda i: rank[i])
        steps += [(i, "approx") for i in group] + [(i, "deviate") for i in group]
    return rows, steps


def _measure(rows: "list[FidelityRow]", steps: "list[tuple[int, str]]", budget_s: float, dtypes: "tuple[str, ...]",
             emit: "Callable[[dict], None] | None" = None) -> None:
    """Run `steps` on `rows` in this process within `budget_s` (SIGALRM soft limit); `emit` hears of each
    step as it starts ({"start": n}) and ends ({"done": n, "row": fields})."""
    from cab import registry
    from cab.analysis.fidelity import Shape, approximation_error, numeric_deviation
    from cab.failures import CellTimeout, time_limit

    shape = Shape(batch=1, heads=2, kv_heads=2, lq=32, lk=32, head_dim=16)
    start = time.perf_counter()

    def left() -> bool:
        return time.perf_counter() - start < budget_s

    def limit():
        """Interrupt a measurement that runs past the budget (a compiling attention can take a minute):
        a SIGALRM in the main thread; elsewhere the budget is only checked between measurements."""
        return time_limit(max(budget_s - (time.perf_counter() - start), 0.05))

    def approximate(row: FidelityRow) -> None:
        try:
            reason = registry.get_spec(row.attention).unavailable_reason("cpu")
        except (Exception, SystemExit) as exc:
            row.note = f"could not run: {_message(exc)}"
            return
        if reason:
            row.note = f"not run: {reason}"
            return
        if not left():
            row.note = "not measured: the report's fidelity time budget ran out"
            return
        try:
            with limit():
                random = approximation_error(row.attention, row.pattern, inputs="random", shape=shape)
                structured = approximation_error(row.attention, row.pattern, inputs="structured", shape=shape)
            row.random, row.structured, row.ran_in = random.relative_rmse, structured.relative_rmse, random.dtype
        except CellTimeout:
            row.note = "not measured: the report's fidelity time budget ran out during it"
        except (Exception, SystemExit) as exc:  # an attention that fails here is reported, not a broken report
            row.note = f"could not run: {_message(exc)}"

    def deviate(row: FidelityRow) -> None:
        if row.note or row.random is None:
            return
        if not left():
            row.note = "numeric deviation not measured: time budget ran out"
            return
        try:
            with limit():
                deviations = numeric_deviation(row.attention, row.pattern, shape=shape, dtypes=dtypes)
            for d in deviations:
                if d.tensor == "output":
                    row.deviation[d.dtype] = (d.error, d.eager_error)
        except CellTimeout:
            row.note = "numeric deviation not measured: time budget ran out during it"
        except (Exception, SystemExit) as exc:
            row.note = f"numeric deviation failed: {_message(exc)}"

    for n, (index, step) in enumerate(steps):
        if emit is not None:
            emit({"start": n})
        (approximate if step == "approx" else deviate)(rows[index])
        if emit is not None:
            emit({"done": n, "row": {name: getattr(rows[index], name) for name in _ROW_FIELDS}})


def _child_main(job: dict, events_path: str, stdout_path: str, stderr_path: str) -> None:
    """The measuring process: load the plugins, measure, write one JSON line per event (flushed at once)."""
    from cab import registry
    from cab.worker import _detach

    _detach(stdout_path, stderr_path, job.get("env") or {})
    with open(events_path, "a", encoding="utf-8") as events:
        def emit(event: dict) -> None:
            events.write(json.dumps(event, default=str) + "\n")
            events.flush()

        registry.discover(job["plugins"])
        emit({"ready": True})
        rows = [FidelityRow(a, p) for a, p in job["rows"]]
        _measure(rows, [tuple(s) for s in job["steps"]], job["budget_s"], tuple(job["dtypes"]), emit)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no interpreter shutdown: plugin code may hang in its atexit handlers


def _read_events(path: Path) -> "list[dict]":
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    events = []
    for line in lines:
        try:
            events.append(json.loads(line))
        except ValueError:
            break  # a line cut short by a dying process
    return events


def _how_it_ended(exitcode: "int | None", killed: "str | None", stderr: str) -> str:
    if killed == "startup":
        return f"the measuring process did not start within {STARTUP_S:g} s"
    if killed == "time":
        return "killed past the report's fidelity time budget"
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    last = next((line.strip() for line in reversed(stderr.splitlines()) if line.strip()), "")
    return f"the measuring process exited with status {exitcode}" + (f" ({last[:200]})" if last else "")


def _run_child(rows: "list[FidelityRow]", steps: "list[tuple[int, str]]", budget_s: float, dtypes: "tuple[str, ...]",
               plugins: "list[str]") -> "tuple[int, str | None]":
    """Run `steps` in a fresh measuring process, applying what it reports to `rows`. Returns how many steps
    finished and, when it died before the end, how (None: it finished them all)."""
    from cab.executors import forkserver
    from cab.executors.subprocess import _kill_tree, _tail
    from cab.worker import device_env

    with tempfile.TemporaryDirectory(prefix="cab-fidelity-") as tmp:
        work = Path(tmp)
        events_path, stdout_path, stderr_path = work / "events.jsonl", work / "stdout.txt", work / "stderr.txt"
        job = {"rows": [(r.attention, r.pattern) for r in rows], "steps": steps, "budget_s": budget_s,
               "dtypes": list(dtypes), "plugins": list(plugins), "env": device_env()}
        proc = forkserver.start(_child_main, (job, str(events_path), str(stdout_path), str(stderr_path)),
                                name="cab-fidelity")
        killed, deadline = None, time.monotonic() + STARTUP_S
        started = False
        try:
            while True:
                proc.join(0.05)
                if proc.exitcode is not None:
                    break
                if not started and _read_events(events_path):
                    started, deadline = True, time.monotonic() + budget_s + HARD_GRACE_S
                if time.monotonic() > deadline:
                    killed = "time" if started else "startup"
                    break
        finally:  # also on KeyboardInterrupt: nothing the attentions started outlives the report
            _kill_tree(proc.pid, running=proc.exitcode is None)
            proc.join()
        done = 0
        for event in _read_events(events_path):
            if "done" in event:
                row = rows[steps[event["done"]][0]]
                fields = event["row"]
                row.random, row.structured, row.ran_in = fields["random"], fields["structured"], fields["ran_in"]
                row.deviation = {d: tuple(v) for d, v in fields["deviation"].items()}
                row.note = fields["note"]
                done = event["done"] + 1
        if done == len(steps) and killed is None:
            return done, None
        return done, _how_it_ended(proc.exitcode, killed, _tail(stderr_path, 1000))


def fidelity(pairs: "list[tuple[str, str]]", budget_s: float = DEFAULT_BUDGET_S,
             dtypes: "tuple[str, ...] | None" = None, plugins: "list[str] | None" = None,
             isolated: bool = True) -> Fidelity:
    """Measure the (attention, pattern) pairs within `budget_s` seconds (0 measures nothing); numeric
    deviation in `dtypes` (default: float32, bfloat16, float16). `isolated` (the default) measures in a
    separate process that loads `plugins` (default: the --plugin specs loaded in this process), killed past
    the budget; False measures in this process (tests)."""
    from cab import registry
    from cab.analysis.fidelity import DEVIATION_DTYPES

    dtypes = tuple(dtypes or DEVIATION_DTYPES)
    rows, steps = _ordered(pairs)
    start = time.perf_counter()
    if not isolated:
        _measure(rows, steps, budget_s, dtypes)
    else:
        plugins = registry.loaded_plugin_specs() if plugins is None else list(plugins)
        pending = steps
        while pending:
            remaining = budget_s - (time.perf_counter() - start)
            if remaining <= 0:
                for index, step in pending:  # notes only: the budget ran out before these
                    row = rows[index]
                    if step == "approx" and not row.note:
                        row.note = "not measured: the report's fidelity time budget ran out"
                    elif step == "deviate" and not row.note and row.random is not None:
                        row.note = "numeric deviation not measured: time budget ran out"
                break
            done, died = _run_child(rows, pending, remaining, dtypes, plugins)
            if died is None:
                break
            if done < len(pending):  # the measurement it died in
                index, step = pending[done]
                row = rows[index]
                if "budget" in died:
                    row.note = ("not measured: the report's fidelity time budget ran out during it" if step == "approx"
                                else "numeric deviation not measured: time budget ran out during it")
                elif step == "approx":
                    row.random = row.structured = None
                    row.note = f"could not run: {died}"
                else:
                    row.note = f"numeric deviation failed: {died}"
                done += 1
            pending = [(i, s) for i, s in pending[done:] if not (s == "deviate" and rows[i].note)]
    complete = all("budget" not in row.note for row in rows)
    records = []
    for row in rows:
        record = {"attention": row.attention, "pattern": row.pattern, "approx_rel_rmse_random": row.random,
                  "approx_rel_rmse_structured": row.structured, "approx_dtype": row.ran_in or None}
        for dtype in dtypes:
            error, eager = row.deviation.get(dtype, (None, None))
            record[f"deviation_{dtype}"] = error
            record[f"eager_deviation_{dtype}"] = eager
        record["note"] = row.note or None
        records.append(record)
    return Fidelity(rows=tuple(rows), dtypes=dtypes, budget_s=budget_s,
                    elapsed_s=time.perf_counter() - start, complete=complete, frame=pd.DataFrame(records))
