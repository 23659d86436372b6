"""The efficiency analyses shown beside the efficiency tables: log-log plots of time and memory versus
length per table (pattern, mode, dtype, device, shape), the efficiency-length table against eager
(`vanilla`) and fused (`sdpa`) exact attention with bootstrap intervals, the fitted complexity exponents
beside the theoretical ones, and decode latency with state size (cab.analysis does the computing).

Speed of an attention whose conformance checks fail for the pattern is withheld here as in the tables."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from cab.report.efficiency import EfficiencyTable
from cab.report.fields import integer, text
from cab.report.plots import Plot, Series, line_panels
from cab.report.rankings import BASELINES, TOP, ranking_column
from cab.tables import RECORD

N_BOOT = 200  # bootstrap resamples for the report's intervals (cab analyze uses 1000)
OUTCOMES = {"crosses": "crosses", "always_cheaper": "cheaper at every measured length",
            "never_cheaper": "never cheaper in range", "ends_dearer": "dearer at the longest length",
            "no_crossing": "no crossing", "too_few_lengths": "too few common lengths"}

LENGTH_COLUMNS = ["configuration", "attention", "metric", "baseline", "efficiency_length", "interval_95",
                  "first_cheaper", "lengths", "outcome"]
EXPONENT_COLUMNS = ["configuration", "attention", "metric", "exponent", "interval_95", "theoretical",
                    "theory_source", "lengths", "no_result_from"]
DECODE_COLUMNS = ["attention", "pattern", "context", "median_ms", "p20_ms", "p80_ms", "tokens_per_s", "state_bytes",
                  "configuration"]


@dataclass(frozen=True)
class Costs:
    plots: dict  # efficiency table id -> Plot
    lengths: pd.DataFrame  # efficiency lengths (display frame)
    exponents: pd.DataFrame
    decode: pd.DataFrame
    exports: tuple
    notes: tuple = ()  # analyses that could not be computed, and why


def _lengths_of(table: EfficiencyTable) -> "list[int | None]":
    """The query length of each column ('256' or '64×256')."""
    out = []
    for column in table.columns:
        head = column.split("×")[0]
        out.append(int(head) if head.isdigit() else None)
    return out


def plotted_rows(table: EfficiencyTable, top: int = TOP) -> list:
    """The rows a plot draws: sdpa and vanilla, and the `top` fastest others at the ranking's length."""
    col = ranking_column(table)
    timed = sorted((r for r in table.rows if r.cells[col].state == "ok" and r.cells[col].median_ms is not None),
                   key=lambda r: (r.cells[col].median_ms, r.name.casefold()))
    base = {r.name for r in table.rows if r.attention in BASELINES and r.name == r.attention}
    return [r for r in table.rows if r.name in base] + [r for r in timed if r.name not in base][:top]


def table_plot(table: EfficiencyTable) -> "Plot | None":
    """Time (median with p20-p80 bars) and peak memory versus length, log-log: sdpa, vanilla and the fastest
    others at the ranking's length (at most TOP + 2 series, so the legend stays readable)."""
    xs = _lengths_of(table)
    if sum(x is not None for x in xs) < 2:
        return None
    time_series, memory_series = [], []
    rows = plotted_rows(table)
    for row in rows:
        ok = [c if c.state == "ok" else None for c in row.cells]
        time_series.append(Series(row.name, tuple(xs), tuple(c and c.median_ms for c in ok),
                                  tuple(c and c.p20_ms for c in ok), tuple(c and c.p80_ms for c in ok)))
        memory_series.append(Series(row.name, tuple(xs), tuple(c and c.mem_mib for c in ok)))
    if not any(v is not None for s in time_series for v in s.y):
        return None
    n_base = sum(r.attention in BASELINES and r.name == r.attention for r in rows)
    cross = any("×" in c for c in table.columns)
    xlabel = "query length Lq (tokens, log scale)" if cross else "sequence length L (tokens, log scale)"
    return line_panels(
        [(f"time · {table.title}", xlabel, "median time (ms, log scale)", time_series),
         (f"peak memory · {table.title}", xlabel, "peak memory (MiB, log scale)", memory_series)],
        loglog=True, alt=f"time and peak memory versus length, {table.title}, {table.shape}",
        caption=f"{table.title}, {table.shape}: median time with p20–p80 bars and peak memory against length "
                f"(log-log; a slope of 2 is quadratic) of sdpa, vanilla and the {len(rows) - n_base} fastest of "
                f"{len(table.rows)} rows at L={table.columns[ranking_column(table)]} (every row is in the table). "
                f"Missing points: no result, a failed cell, or speed withheld.")


def _usable(bench: pd.DataFrame, gated: "set[tuple[str, str]]") -> pd.DataFrame:
    """Rows of the typed bench table the analyses can read: ungated, with integral lengths and sizes and
    metrics (a partial or hand-edited store may hold NULLs)."""
    if bench.empty:
        return bench
    fields = ("lq", "lk", "batch", "heads", "kv_heads", "head_dim")
    keep = [
        (text(r.get("attention")), text(r.get("pattern"))) not in gated
        and all(integer(r.get(f)) is not None for f in fields) and r.get(RECORD) is not None
        and all(text(r.get(f)) for f in ("attention", "pattern", "mode", "dtype", "device", "status"))
        for r in bench.to_dict("records")
    ]
    usable = bench[keep].copy()
    for f in fields:
        usable[f] = usable[f].astype(int)
    return usable


def _guarded(fn, results: pd.DataFrame, columns: "list[str]") -> "tuple[pd.DataFrame, str]":
    try:
        return fn(results), ""
    except Exception as exc:  # an analysis that cannot read odd rows must not break the report
        return pd.DataFrame(columns=columns), f"{fn.__name__} failed: {type(exc).__name__}: {exc}"


def _interval(low, high, span: tuple) -> str:
    def missing(x) -> bool:
        return x is None or (isinstance(x, float) and math.isnan(x))

    if missing(low) or missing(high):
        return ""

    def end(x) -> str:
        if math.isinf(x):
            return f"<{span[0]}" if x < 0 else f">{span[1]}"
        return f"{x:,.0f}"

    return f"[{end(low)}, {end(high)}]"


def _config(row: dict) -> str:
    ratio = row.get("kv_ratio")
    cross = "" if ratio in (None, 1.0) or (isinstance(ratio, float) and math.isnan(ratio)) else f" Lk/Lq={ratio:g}"
    kv = "" if row.get("kv_heads") == row.get("heads") else f" (KV {row.get('kv_heads')})"
    return (f"{row.get('pattern')} · {row.get('mode')} · {row.get('dtype')} · {row.get('device')} · "
            f"B={row.get('batch')} H={row.get('heads')}{kv} D={row.get('head_dim')}{cross}")


def _plain(value):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value


def efficiency_lengths(results: pd.DataFrame) -> pd.DataFrame:
    from cab.analysis.tables import efficiency_table

    raw = efficiency_table(results, n_boot=N_BOOT)
    rows = []
    for r in raw.to_dict("records"):
        span = (integer(r.get("min_length")), integer(r.get("max_length")))
        fails = integer(r.get("baseline_fails_from"))
        outcome = OUTCOMES.get(text(r.get("outcome")), text(r.get("outcome")))
        if fails is not None:
            outcome += f"; {r.get('baseline')} {text(r.get('baseline_status'))} from {fails}"
        length = _plain(r.get("length"))
        rows.append({
            "configuration": _config(r), "attention": r["attention"], "metric": r["metric"],
            "baseline": r["baseline"], "efficiency_length": None if length is None else round(float(length)),
            "interval_95": _interval(r.get("low"), r.get("high"), span) or None,
            "first_cheaper": integer(r.get("first_cheaper")),
            "lengths": f"{span[0]}–{span[1]}" if span[0] is not None else None, "outcome": outcome,
        })
    return pd.DataFrame(rows, columns=LENGTH_COLUMNS)


def exponents(results: pd.DataFrame) -> pd.DataFrame:
    from cab.analysis.tables import exponent_table

    raw = exponent_table(results, n_boot=N_BOOT)
    rows = []
    for r in raw.to_dict("records"):
        low, high = _plain(r.get("low")), _plain(r.get("high"))
        fails = integer(r.get("fails_from"))
        rows.append({
            "configuration": _config(r), "attention": r["attention"], "metric": r["metric"],
            "exponent": _plain(r.get("exponent")),
            "interval_95": f"[{low:.2f}, {high:.2f}]" if low is not None and high is not None else None,
            "theoretical": _plain(r.get("theoretical")), "theory_source": text(r.get("theory_source")) or None,
            "lengths": (f"{integer(r.get('min_length'))}–{integer(r.get('max_length'))}"
                        if integer(r.get("min_length")) is not None else None),
            "no_result_from": f"{text(r.get('fail_status'))} from {fails}" if fails is not None else None,
        })
    return pd.DataFrame(rows, columns=EXPONENT_COLUMNS)


def decode(results: pd.DataFrame) -> pd.DataFrame:
    from cab.analysis.tables import decode_table

    raw = decode_table(results)
    if raw.empty:
        return pd.DataFrame(columns=DECODE_COLUMNS)
    raw = raw.copy()
    raw["configuration"] = [f"{r['dtype']} · {r['device']} · B={r['batch']} H={r['heads']} D={r['head_dim']}"
                            for r in raw.to_dict("records")]
    return raw[DECODE_COLUMNS]


def costs(bench: pd.DataFrame, tables: "list[EfficiencyTable]", gated: "set[tuple[str, str]]") -> Costs:
    """Plots per efficiency table and the analysis tables of the ungated rows of the typed bench table."""
    plots = {t.id: p for t in tables if (p := table_plot(t)) is not None}
    usable = _usable(bench, gated)
    lengths, n1 = _guarded(efficiency_lengths, usable, LENGTH_COLUMNS)
    exps, n2 = _guarded(exponents, usable, EXPONENT_COLUMNS)
    dec, n3 = _guarded(decode, usable, DECODE_COLUMNS)
    exports = (("efficiency-lengths", "Efficiency lengths", lengths), ("exponents", "Complexity exponents", exps),
               ("decode", "Decode latency and state", dec))
    return Costs(plots=plots, lengths=lengths, exponents=exps, decode=dec, exports=exports,
                 notes=tuple(n for n in (n1, n2, n3) if n))
