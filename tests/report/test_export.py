"""Export of the results table: CSV, JSON and Parquet read back with pandas and compared with the store."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pandas as pd
import pytest

from cab.cells import Cell, Result
from cab.export import export_results
from cab.report import ReportError
from cab.status import Status
from cab.store import ResultStore

HOSTILE_MESSAGE = 'line one, "quoted"\nline two; <script>alert(1)</script>\ttab é'
SAMPLES = [1.25, 1.5, 1.75]


def results() -> "list[Result]":
    ok = Result(
        Cell(kind="bench", attention="vanilla", pattern="NS", lq=128, lk=128, mode="fwd", hparams={"w": [1, 2]}),
        Status.OK, metrics={"median_ms": 1.5, "p20_ms": 1.25, "p80_ms": 1.75, "n": 3, "high_cv": False,
                            "peak_mem_bytes": 4 * 2 ** 20, "timer": "cpu", "samples_ms": SAMPLES},
        provenance={"torch": "2.13.0", "device": "cpu"}, wall_s=0.5,
    )
    failed = Result(Cell(kind="bench", attention="sdpa", pattern="CS", lq=256, lk=256, mode="bwd", label="SDPA, fused"),
                    Status.OOM, message=HOSTILE_MESSAGE)
    checked = Result(Cell(kind="check", attention="leaky", pattern="CS"), Status.INCORRECT,
                     metrics={"verdict": "incorrect", "checks": [{"name": "causality", "status": "incorrect",
                                                                   "error": 0.12, "tolerance": 1e-6}]},
                     message="causality")
    return [ok, failed, checked]


@pytest.fixture()
def db(tmp_path) -> Path:
    path = tmp_path / "results" / "cab.sqlite"
    with ResultStore(path) as store:
        for result in results():
            store.put(result)
    return path


def by_key(records: "list[dict]") -> "dict[str, dict]":
    return {r["key"]: r for r in records}


def expected() -> "dict[str, Result]":
    return {r.key: r for r in results()}


def test_csv_round_trip(db):
    out = export_results(db, "csv")
    assert out == db.with_suffix(".csv")
    frame = pd.read_csv(out)
    rows = by_key(frame.to_dict("records"))
    assert set(rows) == set(expected())
    for key, result in expected().items():
        row = rows[key]
        message = row["message"] if isinstance(row["message"], str) else ""  # an empty field reads as NaN
        assert row["status"] == result.status.value and message == result.message
        assert row["label"] == result.cell.display_name and row["lq"] == result.cell.lq
        assert json.loads(row["hparams"]) == result.cell.hparams
        metrics = {k: v for k, v in result.metrics.items() if k != "samples_ms"}
        assert json.loads(row["metrics"]) == metrics, "metrics as JSON text, without the samples"
    ok = rows[results()[0].key]
    assert ok["m_median_ms"] == 1.5 and ok["m_n"] == 3 and ok["m_timer"] == "cpu"
    assert "samples" not in out.read_text(encoding="utf-8")


def test_json_round_trip_keeps_nested_fields_and_samples(db):
    out = export_results(db, "JSON", db.parent / "export" / "all.json")
    assert out == db.parent / "export" / "all.json"
    records = by_key(json.loads(out.read_text(encoding="utf-8")))
    frame = pd.read_json(out, orient="records", dtype=False)
    assert sorted(frame["key"]) == sorted(expected())
    for key, result in expected().items():
        record = records[key]
        assert record["metrics"] == result.metrics and record["hparams"] == result.cell.hparams
        assert record["provenance"] == result.provenance and record["message"] == result.message
        assert record["lq"] == result.cell.lq and isinstance(record["lq"], int)
        assert not any(k.startswith("m_") for k in record)
    assert records[results()[0].key]["metrics"]["samples_ms"] == SAMPLES


def test_parquet_round_trip_with_typed_metric_columns(db, tmp_path):
    out = export_results(db, "parquet", tmp_path / "all.parquet")
    frame = pd.read_parquet(out)
    rows = by_key(frame.to_dict("records"))
    for key, result in expected().items():
        row = rows[key]
        assert row["status"] == result.status.value and row["message"] == result.message
        assert json.loads(row["metrics"]) == {k: v for k, v in result.metrics.items() if k != "samples_ms"}
    assert pd.api.types.is_float_dtype(frame["m_median_ms"])
    assert pd.api.types.is_integer_dtype(frame["m_peak_mem_bytes"]) and pd.api.types.is_integer_dtype(frame["lq"])
    assert pd.api.types.is_bool_dtype(frame["m_high_cv"])
    assert rows[results()[0].key]["m_peak_mem_bytes"] == 4 * 2 ** 20


def test_parquet_accepts_a_metric_of_mixed_types(db, tmp_path):
    with ResultStore(db) as store:
        store.put(Result(Cell(kind="bench", attention="odd", pattern="NS", mode="fwd"), Status.OK,
                         metrics={"timer": 3, "n": "many"}))
    frame = pd.read_parquet(export_results(db, "parquet", tmp_path / "mixed.parquet"))
    assert set(frame["m_timer"].dropna()) == {'"cpu"', "3"}
    assert set(frame["m_n"].dropna()) == {"3", '"many"'}


def test_unknown_format_is_a_clear_error(db):
    with pytest.raises(ValueError, match="unknown export format 'xlsx': choose one of csv, json, parquet"):
        export_results(db, "xlsx")
    assert sorted(p.name for p in db.parent.iterdir() if not p.name.startswith("cab.sqlite")) == []


def test_missing_store_is_an_error_and_is_not_created(tmp_path):
    db = tmp_path / "nowhere" / "cab.sqlite"
    with pytest.raises(ReportError, match="no results in"):
        export_results(db, "csv")
    assert not db.exists()


def test_empty_store_is_an_error(tmp_path):
    db = tmp_path / "cab.sqlite"
    ResultStore(db).close()
    with pytest.raises(ReportError, match="no results in"):
        export_results(db, "json")


def test_refuses_to_overwrite_the_store(db):
    with pytest.raises(ValueError, match="refusing to export over the results store"):
        export_results(db, "csv", db)
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 3
