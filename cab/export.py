"""Exports the results table (one row per result) as CSV, JSON or Parquet.

JSON keeps the structured fields nested and includes the raw timing samples; CSV and Parquet hold the
structured fields as JSON strings, without sample lists, plus one `m_<name>` column per scalar metric.
In CSV a text cell that a spreadsheet would take for a formula (=, +, -, @, tab, carriage return first)
gets a leading single quote (OWASP); numbers stay numbers. The file is written to a temporary file beside
the output and renamed, so a full disk leaves no empty or half file; an output path that cannot be written
is refused before the store is read.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from cab.destinations import creation_problem
from cab.report.export import csv_text, write_atomically
from cab.report.load import ReportError, read_store

FORMATS = ("csv", "json", "parquet")
JSON_COLUMNS = ("hparams", "options", "metrics", "provenance")
INTEGER_COLUMNS = ("batch", "heads", "kv_heads", "lq", "lk", "head_dim", "seed")


def is_sample_list(name: str, value: Any) -> bool:
    """Raw per-sample measurements (e.g. `samples_ms`), which only the JSON export carries."""
    return name.startswith("samples") and isinstance(value, list)


def _plain(value: Any) -> Any:
    """A JSON-ready Python value: NaN/NA to None, numpy scalars to Python numbers, containers walked."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    return value.item() if hasattr(value, "item") else value


def _base_frame(results: pd.DataFrame) -> pd.DataFrame:
    """The store's columns without the flattened metrics, integer columns kept integral beside NULLs."""
    frame = results[[c for c in results.columns if not c.startswith("m_")]].copy()
    for column in INTEGER_COLUMNS:
        if column in frame:
            frame[column] = pd.to_numeric(frame[column], errors="coerce").round().astype("Int64")
    return frame


def _uniform(column: pd.Series) -> pd.Series:
    """One type per metric column (Parquet needs it): numbers, booleans or text; mixed ones become JSON text."""
    present = [v for v in column if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return pd.to_numeric(column, errors="coerce").round().astype("Int64")
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return pd.to_numeric(column, errors="coerce")
    if all(isinstance(v, bool) for v in present):
        return column.map(lambda v: v if isinstance(v, bool) else None).astype("boolean")
    if all(isinstance(v, str) for v in present):
        return column.map(lambda v: v if isinstance(v, str) else None)
    return column.map(lambda v: json.dumps(_plain(v)) if v is not None and v == v else None)


def _json_text(value: Any) -> str:
    return json.dumps(_plain(value), sort_keys=True)


def _metrics_text(metrics: Any) -> str:
    """Metrics as JSON text without their sample lists."""
    if isinstance(metrics, dict):
        metrics = {k: v for k, v in metrics.items() if not is_sample_list(k, v)}
    return _json_text(metrics)


def flat_frame(results: pd.DataFrame) -> pd.DataFrame:
    """CSV/Parquet form: structured fields as JSON strings (no sample lists), scalar metrics as m_ columns."""
    frame = _base_frame(results)
    for column in frame.columns:  # the known JSON fields, and any other structured cell field (task_params)
        if column in JSON_COLUMNS or frame[column].map(lambda v: isinstance(v, (dict, list))).any():
            frame[column] = frame[column].map(_metrics_text if column == "metrics" else _json_text)
    # taken from the metrics dicts, not the store's m_ columns, where pandas made floats of integers
    metrics = [m if isinstance(m, dict) else {} for m in results["metrics"]]
    names = sorted(c[2:] for c in results.columns if c.startswith("m_"))
    columns = [_uniform(pd.Series([m.get(n) for m in metrics], index=frame.index, dtype=object, name=f"m_{n}"))
               for n in names]
    return pd.concat([frame, *columns], axis=1)


def csv_frame(results: pd.DataFrame) -> pd.DataFrame:
    """flat_frame with formula-like text cells neutralised for spreadsheets (text columns only)."""
    frame = flat_frame(results)
    for column in frame.columns:
        if not (pd.api.types.is_numeric_dtype(frame[column]) or pd.api.types.is_bool_dtype(frame[column])):
            frame[column] = frame[column].map(lambda v: csv_text(v) if isinstance(v, str) else v)
    return frame


def check_output_file(out: Path, option: str = "--out") -> None:
    """Refuse, before anything is read or run, an output file path that is a folder or cannot be created."""
    if out.is_dir():
        raise ReportError(f"{option} {out} is a folder; give a file path such as {out / 'cab.csv'}")
    if out.exists() and not out.is_file():
        raise ReportError(f"{option} {out} is not a regular file; give a file path")
    problem = creation_problem(out.parent, out, option)
    if problem:
        raise ReportError(problem)


def nested_records(results: pd.DataFrame) -> "list[dict]":
    """JSON form: one dict per result with hparams, options, metrics (samples included) and provenance nested."""
    return [_plain(record) for record in _base_frame(results).to_dict("records")]


def export_results(db_path: "str | Path", fmt: str, out_path: "str | Path | None" = None) -> Path:
    """Write the results of the store at db_path as csv, json or parquet; returns the file written.

    The default output is next to the store with the format's extension (results/cab.csv). Raises
    ValueError for an unknown format and cab.report.ReportError for a missing or empty store."""
    fmt = fmt.strip().lower()
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    db = Path(db_path)
    out = Path(out_path) if out_path is not None else db.with_suffix(f".{fmt}")
    if out.resolve() == db.resolve():
        raise ValueError(f"refusing to export over the results store itself ({db}); choose another output path")
    check_output_file(out)
    results, _ = read_store(db)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "json":
        text = json.dumps(nested_records(results), indent=1, allow_nan=False, default=str) + "\n"
        write_atomically(out, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    elif fmt == "csv":
        frame = csv_frame(results)
        write_atomically(out, lambda tmp: frame.to_csv(tmp, index=False))
    else:
        frame = flat_frame(results)
        write_atomically(out, lambda tmp: frame.to_parquet(tmp, index=False))
    return out
