"""The efficiency analyses of a results store as tables: efficiency lengths of every attention against
the exact baselines (eager `vanilla` and the fused `sdpa`), fitted complexity exponents beside the
theoretical ones, and decode latency with the state held per context length. All take a typed results
table (cab.tables; `ResultStore.dataframe()` is read through the metrics schema once) and return pandas
DataFrames (the report and `cab analyze` print them)."""

from __future__ import annotations

import pandas as pd

from cab.analysis.curves import METRICS, Curve, bench_curves
from cab.analysis.efficiency_length import MIN_LENGTHS, efficiency_length
from cab.analysis.exponent import complexity_exponent
from cab.analysis.theory import theoretical_exponent
from cab.tables import typed_rows

DEFAULT_BASELINES = ("sdpa", "vanilla")


def _config_columns(curve: Curve) -> dict:
    return {"attention": curve.label, **curve.config_dict()}


def _first_failure(curve: Curve, after: int) -> "tuple[int | None, str]":
    """The shortest length beyond `after` where the curve has no measurement, and why."""
    later = sorted(n for n in curve.failed if n > after)
    return (later[0], curve.failed[later[0]]) if later else (None, "")


def efficiency_table(
    df: pd.DataFrame,
    *,
    baselines: "tuple[str, ...]" = DEFAULT_BASELINES,
    metrics: "tuple[str, ...]" = METRICS,
    method: str = "robust",
    confidence: float = 0.95,
    n_boot: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per (attention, configuration, metric, baseline): the efficiency length over the lengths
    both measured, with its interval and outcome. `baseline_fails_from` is the shortest longer length at
    which the baseline has no measurement while the attention has one (e.g. eager attention out of
    memory), and `baseline_status` says why. Method "cab" follows CAB's script for each metric (for time the
    efficient line leaves out the shortest length; see cab.analysis.efficiency_length) and needs three
    lengths; the robust method needs two."""
    rows = []
    for metric in metrics:
        curves = bench_curves(df, metric)
        by_config: dict = {}
        for curve in curves:
            by_config.setdefault(curve.config, []).append(curve)
        for config, group in by_config.items():
            for baseline in baselines:
                base = next((c for c in group if c.label == baseline), None)
                if base is None:
                    continue
                for curve in group:
                    if curve is base or not curve.points:
                        continue
                    common = sorted(set(curve.points) & set(base.points))
                    row = {**_config_columns(curve), "metric": metric, "baseline": baseline,
                           "n_lengths": len(common)}
                    if len(common) >= MIN_LENGTHS.get(method, 2):
                        found = efficiency_length(common, base.values(common), curve.values(common), method,
                                                  metric=metric, confidence=confidence, n_boot=n_boot, seed=seed)
                        row.update(outcome=found.outcome, length=found.length, low=found.low, high=found.high,
                                   first_cheaper=found.first_cheaper, min_length=common[0], max_length=common[-1])
                    else:
                        row.update(outcome="too_few_lengths", length=None, low=None, high=None, first_cheaper=None,
                                   min_length=common[0] if common else None, max_length=common[-1] if common else None)
                    beyond = max(common) if common else 0
                    fails = [n for n in sorted(base.failed) if n > beyond and n in curve.points]
                    row["baseline_fails_from"] = fails[0] if fails else None
                    row["baseline_status"] = base.failed[fails[0]] if fails else ""
                    rows.append(row)
    return pd.DataFrame(rows)


def exponent_table(
    df: pd.DataFrame,
    *,
    metrics: "tuple[str, ...]" = METRICS,
    min_length: "int | None" = None,
    confidence: float = 0.95,
    n_boot: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per (attention, configuration, metric): the fitted exponent over the measured lengths
    (>= min_length) with its interval, beside the theoretical exponent and where that comes from."""
    rows = []
    for metric in metrics:
        for curve in bench_curves(df, metric):
            if not curve.points and set(curve.failed.values()) <= {"unsupported"}:
                continue  # a configuration the attention does not support: the support matrix says so
            lengths = [n for n in curve.lengths if min_length is None or n >= min_length]
            theory, source = theoretical_exponent(curve.attention, metric)
            row = {**_config_columns(curve), "metric": metric, "theoretical": theory, "theory_source": source,
                   "n_lengths": len(lengths), "min_length": lengths[0] if lengths else None,
                   "max_length": lengths[-1] if lengths else None}
            if len(lengths) >= 2:
                fit = complexity_exponent(lengths, curve.values(lengths), confidence=confidence, n_boot=n_boot,
                                          seed=seed)
                row.update(exponent=fit.slope, low=fit.low, high=fit.high, interval=fit.interval)
            else:
                row.update(exponent=None, low=None, high=None, interval="none")
            failed_from, why = _first_failure(curve, lengths[-1] if lengths else 0)
            row.update(fails_from=failed_from, fail_status=why)
            rows.append(row)
    return pd.DataFrame(rows)


def decode_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per successful decode cell: per-token latency (median, p20, p80 in ms), tokens/s and the
    bytes of KV cache or recurrent state held at that context length."""
    rows = []
    if df.empty or "kind" not in df:
        return pd.DataFrame(rows)
    df = typed_rows(df)
    decoded = df[(df["kind"] == "bench") & (df["mode"] == "decode") & (df["status"] == "ok")]
    for _, row in decoded.iterrows():
        rows.append({
            "attention": row.get("label") or row["attention"], "pattern": row["pattern"], "dtype": row["dtype"],
            "device": row["device"], "batch": row["batch"], "heads": row["heads"], "kv_heads": row["kv_heads"],
            "head_dim": row["head_dim"], "context": row["lk"] if row["context"] is None else row["context"],
            "median_ms": row["median_ms"], "p20_ms": row["p20_ms"], "p80_ms": row["p80_ms"],
            "tokens_per_s": row["tokens_per_s"], "state_bytes": row["state_bytes"],
        })
    table = pd.DataFrame(rows)
    return table.sort_values(["pattern", "attention", "context"], ignore_index=True) if rows else table
