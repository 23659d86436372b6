"""Reads the results store for the report and the export, refusing a missing or empty store clearly."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from cab.store import ResultStore, StoreError

RUN_HINT = "run `cab run configs/quick.yaml` first"


class ReportError(ValueError):
    """The report (or export) cannot be produced: no store, an empty or unreadable one."""


def read_store(db_path: "str | Path") -> "tuple[pd.DataFrame, pd.DataFrame]":
    """(results, runs) frames of the store at db_path; ReportError when it is missing, unreadable or empty.

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
