"""The results of a store as typed tables: each result's metrics read once through its kind's schema
(cab.metrics) into a `record` column and one flat column per metric field, and the rows split by kind.

The report reads the store once into `Tables` (cab.report.load.read_tables) and each section takes the table
it needs; the analyses (cab.analysis) and the task summaries (cab.training.summary) read the same typed
columns, so no reader parses a metrics dict of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import pandas as pd

from cab.metrics import SCHEMAS, Record, read_metrics

RECORD = "record"  # the column holding each row's typed metrics (None for a kind without a schema)


def flat_fields(record: "Record | None") -> dict:
    """A record's fields by the keys the store holds them under (a part's fields flattened, the dict of the
    keys the schema does not name kept whole under its field's name: `extra`, a task's `scores`)."""
    if record is None:
        return {}
    out = {}
    for f in fields(record):  # type: ignore[arg-type]
        value = getattr(record, f.name)
        if "part" in f.metadata:
            out.update({g.name: getattr(value, g.name) if value is not None else None
                        for g in fields(f.metadata["part"])})
        else:
            out[f.name] = value
    return out


def _columns() -> "list[str]":
    """Every flat column of every schema, in schema order: a typed frame has them all, whatever kinds it holds."""
    names: dict = {}
    for schema in SCHEMAS:
        for f in fields(schema):
            names.update(dict.fromkeys([g.name for g in fields(f.metadata["part"])] if "part" in f.metadata
                                       else [f.name]))
    return list(names)


COLUMNS = _columns()


def typed_rows(results: pd.DataFrame) -> pd.DataFrame:
    """`results` (ResultStore.dataframe(): one row per result) with each row's metrics read once: the
    `metrics` column and the store's raw `m_<name>` columns are replaced by `record` and a column per metric
    field (None where a row does not hold it). A frame that is already typed is returned as it is."""
    if RECORD in results.columns:
        return results
    kinds = results["kind"] if "kind" in results else pd.Series([None] * len(results), index=results.index)
    modes = results["mode"] if "mode" in results else pd.Series([None] * len(results), index=results.index)
    metrics = results["metrics"] if "metrics" in results else pd.Series([None] * len(results), index=results.index)
    records = [read_metrics(kind, mode, data) for kind, mode, data in zip(kinds, modes, metrics)]
    flats = [flat_fields(record) for record in records]
    names = COLUMNS
    base = results.drop(columns=[c for c in results.columns if c == "metrics" or str(c).startswith("m_")])
    columns = {RECORD: pd.Series(records, index=results.index, dtype=object)}
    columns.update({name: pd.Series([flat.get(name) for flat in flats], index=results.index, dtype=object)
                    for name in names if name not in base.columns})
    return pd.concat([base, pd.DataFrame(columns, index=results.index)], axis=1)


def of_kind(typed: pd.DataFrame, kind: str) -> pd.DataFrame:
    """The rows of a typed frame whose cell kind is `kind` (an empty frame with its columns when none)."""
    if "kind" not in typed:
        return typed.iloc[0:0]
    return typed[typed["kind"] == kind]


@dataclass(frozen=True)
class Tables:
    """A store read once. `results`: every result, typed (typed_rows); `bench`: the bench rows, every mode
    (decode included: the efficiency tables show it), `decode` those of mode decode, `check`, `task`,
    `kernel` the rows of those kinds (the same rows as in `results`, the same columns); `runs`: the store's
    runs."""

    results: pd.DataFrame
    runs: pd.DataFrame
    bench: pd.DataFrame
    decode: pd.DataFrame
    check: pd.DataFrame
    task: pd.DataFrame
    kernel: pd.DataFrame

    @classmethod
    def from_frames(cls, results: pd.DataFrame, runs: "pd.DataFrame | None" = None) -> "Tables":
        """The tables of a store's results and runs frames (ResultStore.dataframe(), .runs_dataframe())."""
        typed = typed_rows(results)
        bench = of_kind(typed, "bench")
        decode = bench[bench["mode"] == "decode"] if "mode" in bench else bench.iloc[0:0]
        return cls(results=typed, runs=runs if runs is not None else pd.DataFrame(), bench=bench, decode=decode,
                   check=of_kind(typed, "check"), task=of_kind(typed, "task"), kernel=of_kind(typed, "kernel"))


__all__ = ["COLUMNS", "RECORD", "Tables", "flat_fields", "of_kind", "typed_rows"]
