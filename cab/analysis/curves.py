"""Cost curves from the results store: one curve per attention and configuration, one point per length
holding every sample taken there (rows that differ only by seed or trial pool their samples).

Input is a typed results table (cab.tables: the report's bench table, or `ResultStore.dataframe()`, read
once through the metrics schema here): bench rows with status ok; time is the `samples_ms` metric, memory
the `peak_mem_bytes` metric of rows whose memory pass succeeded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pandas as pd

from cab.tables import typed_rows

METRICS = ("time", "memory")
# what makes two bench rows points of the same curve (besides the attention)
CONFIG_FIELDS = ("pattern", "mode", "dtype", "device", "batch", "heads", "kv_heads", "head_dim")


@dataclass(frozen=True)
class Curve:
    """The cost of one attention (its label, e.g. "local(window=64)") in one configuration: for each
    measured length, the samples of `metric` (ms for time, bytes for memory). `failed` maps lengths whose
    cells did not succeed to their status (oom, skipped, timeout...)."""

    label: str
    attention: str
    config: tuple
    metric: str
    points: "dict[int, list[float]]"
    failed: "dict[int, str]" = field(default_factory=dict)

    @property
    def lengths(self) -> "list[int]":
        return sorted(self.points)

    def values(self, lengths: "list[int]") -> "list[list[float]]":
        return [self.points[n] for n in lengths]

    def config_dict(self) -> dict:
        return dict(zip(CONFIG_FIELDS + ("kv_ratio",), self.config))


def _samples(row: pd.Series, metric: str) -> "list[float]":
    if metric == "time":
        samples = row["samples_ms"] or []
        return [float(s) for s in samples if s is not None]
    if (row["mem_status"] or "ok") != "ok" or row["peak_mem_bytes"] is None:
        return []
    return [float(row["peak_mem_bytes"])]


def _label(row: pd.Series) -> str:
    label = row.get("label")
    return label if isinstance(label, str) and label else row["attention"]


def _config(row: pd.Series) -> tuple:
    ratio = round(row["lk"] / row["lq"], 6) if row["lq"] else None
    return tuple(row[f] for f in CONFIG_FIELDS) + (ratio,)


def bench_curves(df: pd.DataFrame, metric: str) -> "list[Curve]":
    """Every curve of `metric` ("time" or "memory") in a results table, in a stable order."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if df.empty or "kind" not in df:
        return []
    df = typed_rows(df)
    rows = df[(df["kind"] == "bench") & (df["mode"] != "decode")]
    curves: dict = {}
    for _, row in rows.iterrows():
        key = (_label(row), json.dumps(row.get("hparams") or {}, sort_keys=True), _config(row))
        curve = curves.setdefault(key, Curve(_label(row), row["attention"], key[2], metric, {}, {}))
        length = int(row["lq"])
        samples = _samples(row, metric) if row["status"] == "ok" else []
        if samples:
            curve.points.setdefault(length, []).extend(samples)
        elif length not in curve.points:
            reason = row["status"] if row["status"] != "ok" else f"memory {row['mem_status'] or 'missing'}"
            curve.failed[length] = reason
    for curve in curves.values():
        for length in curve.points:
            curve.failed.pop(length, None)
    return [curves[k] for k in sorted(curves, key=lambda k: (str(k[2]), k[0], k[1]))]
