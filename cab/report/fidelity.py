"""The fidelity section: approximation error against exact softmax attention (random and structured inputs)
and numeric deviation of the output per dtype against float64 (cab.analysis.fidelity).

The store holds no fidelity results, so this is the one part of the report that runs attentions: at a
tiny fixed shape on CPU, with default hyper-parameters, for the registered attentions and patterns that
pass their conformance checks in the store, within a time budget (breadth first: every pair gets its
approximation error before any gets its deviation). What the budget did not reach is shown as not
measured, never as 0."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pandas as pd

from cab.report.support import PATTERNS

DEFAULT_BUDGET_S = 3.0  # what `cab run` spends after a run; `cab report --fidelity-budget` sets it
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


def fidelity(pairs: "list[tuple[str, str]]", budget_s: float = DEFAULT_BUDGET_S,
             dtypes: "tuple[str, ...] | None" = None) -> Fidelity:
    """Measure the (attention, pattern) pairs within `budget_s` seconds (0 measures nothing); numeric
    deviation in `dtypes` (default: float32, bfloat16, float16)."""
    from cab import registry
    from cab.analysis.fidelity import DEVIATION_DTYPES, Shape, approximation_error, numeric_deviation
    from cab.failures import CellTimeout, time_limit

    dtypes = tuple(dtypes or DEVIATION_DTYPES)
    shape = Shape(batch=1, heads=2, kv_heads=2, lq=32, lk=32, head_dim=16)
    order = {p: i for i, p in enumerate(PATTERNS)}
    rows = [FidelityRow(a, p) for a, p in sorted(pairs, key=lambda x: (x[0].casefold(), order.get(x[1], 9)))]
    # measured breadth first: every attention in its first pattern before any in its second
    seen: dict[str, int] = {}
    rank = {}
    for row in rows:
        rank[id(row)] = seen.get(row.attention, 0)
        seen[row.attention] = rank[id(row)] + 1
    queue = sorted(rows, key=lambda r: rank[id(r)])
    start = time.perf_counter()

    def left() -> bool:
        return time.perf_counter() - start < budget_s

    def limit():
        """Interrupt a measurement that runs past the budget (a compiling attention can take a minute):
        a SIGALRM in the main thread; elsewhere the budget is only checked between measurements."""
        return time_limit(max(budget_s - (time.perf_counter() - start), 0.05))

    def approximate(row: FidelityRow) -> None:
        reason = registry.get_spec(row.attention).unavailable_reason("cpu")
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

    # every attention's first pattern gets both measurements before any second pattern gets one
    first = [r for r in queue if rank[id(r)] == 0]
    rest = [r for r in queue if rank[id(r)] > 0]
    for group in (first, rest):
        for row in group:
            approximate(row)
        for row in group:
            deviate(row)
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
