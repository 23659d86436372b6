"""Reads the results store for the report (once, into typed tables: cab.tables) and the export (its rows as
stored), refusing a missing or empty store clearly."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from cab.store import ResultStore, StoreError
from cab.tables import Tables

RUN_HINT = "run `cab run configs/quick.yaml` first"


class ReportError(ValueError):
    """The report (or export) cannot be produced: no store, an empty or unreadable one."""


def read_store(db_path: "str | Path") -> "tuple[pd.DataFrame, pd.DataFrame]":
    """(results, runs) frames of the store at db_path, as stored; ReportError when it is missing, unreadable
    or empty.

    A missing path is reported, never created (opening a ResultStore would create an empty one)."""
    path = Path(db_path)
    if not path.is_file():
        what = "a directory, not a results store" if path.is_dir() else "no such file"
        raise ReportError(f"no results in {path} ({what}): {RUN_HINT}")
    try:
        with ResultStore(path, readonly=True) as store:
            results, runs = store.dataframe(), store.runs_dataframe()
    except StoreError as exc:
        raise ReportError(str(exc)) from exc
    except (ValueError, TypeError) as exc:  # rows the store's reader cannot parse (hand-edited, foreign)
        raise ReportError(f"{path} holds rows this cab cannot read ({type(exc).__name__}: {exc})") from exc
    if results.empty:
        raise ReportError(f"no results in {path}: {RUN_HINT}")
    return results, runs


def read_tables(db_path: "str | Path") -> Tables:
    """The store at db_path read once into typed tables (each result's metrics through its schema), what the
    report's sections take their data from; ReportError as read_store."""
    return Tables.from_frames(*read_store(db_path))
