"""The report reads the store once: cab.report.load.read_tables parses every result's metrics through its
kind's schema (cab.metrics) in one pass into typed tables, one per kind, which the sections take from."""

import json

import pandas as pd
import pytest

from cab import metrics as schema
from cab.cells import Cell, Result
from cab.metrics import BenchMetrics, CheckMetrics, DecodeMetrics, TaskMetrics
from cab.report.load import ReportError, read_tables
from cab.status import Status
from cab.store import ResultStore
from cab.tables import COLUMNS, RECORD, Tables, typed_rows

BENCH = {"samples_ms": [1.0, 2.0], "median_ms": 1.5, "p20_ms": 1.2, "p80_ms": 1.8, "gate": "ok", "flops": 4096,
         "tflops": 0.002, "backend": "torch", "mem_status": "ok", "peak_mem_bytes": 2048}
DECODE = {"median_ms": 0.2, "context": 128, "state_bytes": 8192, "tokens_per_s": 5000.0}
CHECK = {"verdict": "ok", "checks": [{"name": "forward", "status": "ok"}], "coverage": {}}
TASK = {"accuracy": 0.5, "chance": {"accuracy": 0.1}, "steps": 10, "final_loss": 1.5}


def _results() -> "list[Result]":
    bench = Cell(kind="bench", attention="sdpa", pattern="NS", lq=64, lk=64, mode="fwd")
    decode = Cell(kind="bench", attention="sdpa", pattern="CS", lq=64, lk=64, mode="decode")
    check = Cell(kind="check", attention="sdpa", pattern="NS", lq=64, lk=64)
    task = Cell(kind="task", attention="sdpa", pattern="CS", task="recall", task_params={"length": 32}, mode="train")
    return [Result(bench, Status.OK, metrics=BENCH), Result(decode, Status.OK, metrics=DECODE),
            Result(check, Status.OK, metrics=CHECK), Result(task, Status.OK, metrics=TASK)]


def _store(path, results) -> str:
    with ResultStore(path) as store:
        for result in results:
            store.put(result)
    return str(path)


def test_one_pass_builds_every_table(tmp_path, monkeypatch):
    db = _store(tmp_path / "cab.sqlite", _results())
    parsed = []
    real = schema.read_metrics
    monkeypatch.setattr("cab.tables.read_metrics", lambda *a: parsed.append(a) or real(*a))
    tables = read_tables(db)
    assert len(parsed) == 4  # each stored metrics object is read once, whatever the sections need
    assert (len(tables.results), len(tables.bench), len(tables.decode), len(tables.check), len(tables.task),
            len(tables.kernel)) == (4, 2, 1, 1, 1, 0)
    assert "metrics" not in tables.results and not any(str(c).startswith("m_") for c in tables.results)
    fwd = tables.bench[tables.bench["mode"] == "fwd"].iloc[0]
    assert (fwd["median_ms"], fwd["peak_mem_bytes"], fwd["mem_status"], fwd["context"]) == (1.5, 2048, "ok", None)
    assert isinstance(fwd[RECORD], BenchMetrics) and fwd[RECORD].timing.samples_ms == [1.0, 2.0]
    decode = tables.decode.iloc[0]
    assert isinstance(decode[RECORD], DecodeMetrics) and (decode["state_bytes"], decode["context"]) == (8192, 128)
    check = tables.check.iloc[0]
    assert isinstance(check[RECORD], CheckMetrics) and check["checks"] == CHECK["checks"]
    task = tables.task.iloc[0]
    assert isinstance(task[RECORD], TaskMetrics) and task["scores"] == {"accuracy": 0.5}
    assert task["chance"] == {"accuracy": 0.1} and task["steps"] == 10
    assert len(tables.runs) == 0
    assert typed_rows(tables.results) is tables.results  # a typed frame is not read again


def test_a_store_with_some_kinds_has_every_column(tmp_path):
    tasks_only = [r for r in _results() if r.cell.kind == "task"]
    tables = read_tables(_store(tmp_path / "cab.sqlite", tasks_only))
    assert tables.bench.empty and tables.decode.empty and tables.check.empty and len(tables.task) == 1
    assert set(COLUMNS) <= set(tables.results.columns) and set(COLUMNS) <= set(tables.check.columns)
    assert tables.results["median_ms"].tolist() == [None]


def test_malformed_rows_read_as_missing_values(tmp_path):
    db = _store(tmp_path / "cab.sqlite", _results())
    with ResultStore(db) as store:
        store._conn.execute("UPDATE results SET metrics = ? WHERE kind = 'check'", (json.dumps([1, 2]),))
        store._conn.execute("UPDATE results SET metrics = NULL WHERE kind = 'task'")
        store._conn.execute("UPDATE results SET metrics = ? WHERE mode = 'fwd'",
                            (json.dumps({"median_ms": "slow", "peak_mem_bytes": None, "new": 1}),))
        store._conn.commit()
    tables = read_tables(db)
    fwd = tables.bench[tables.bench["mode"] == "fwd"].iloc[0]
    assert fwd["median_ms"] is None and fwd["peak_mem_bytes"] is None
    assert fwd["extra"] == {"median_ms": "slow", "new": 1}
    assert tables.check.iloc[0]["checks"] is None and tables.task.iloc[0]["scores"] == {}


def test_a_frame_of_unknown_kinds_and_missing_columns_is_typed():
    frame = pd.DataFrame([{"kind": "mystery", "metrics": {"x": 1}}, {"kind": "task", "metrics": {"bpc": 2.0}}])
    tables = Tables.from_frames(frame)
    assert tables.results[RECORD].tolist()[0] is None and tables.task.iloc[0]["scores"] == {"bpc": 2.0}
    assert tables.decode.empty and tables.runs.empty


def test_a_missing_store_is_refused(tmp_path):
    with pytest.raises(ReportError, match="no such file"):
        read_tables(tmp_path / "none.sqlite")
