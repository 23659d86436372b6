"""The results store: SQLite, one row per cell upserted by key, written as each cell finishes.

WAL mode and one transaction per result mean an interrupted run loses no finished cell, and the
keys already present are what a rerun skips. The schema version lives in `PRAGMA user_version`.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from pathlib import Path
from typing import Iterable

import pandas as pd

from cab.cells import Cell, Result
from cab.status import Status

SCHEMA_VERSION = 1

_CELL_COLUMNS = (
    ("kind", "TEXT"), ("attention", "TEXT"), ("label", "TEXT"), ("hparams", "TEXT"), ("pattern", "TEXT"),
    ("batch", "INTEGER"), ("heads", "INTEGER"), ("kv_heads", "INTEGER"), ("lq", "INTEGER"), ("lk", "INTEGER"),
    ("head_dim", "INTEGER"), ("dtype", "TEXT"), ("device", "TEXT"), ("mode", "TEXT"), ("seed", "INTEGER"),
)
_JSON_CELL_FIELDS = {"hparams"}

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS results (
    key TEXT PRIMARY KEY,
    {", ".join(f"{name} {kind}" for name, kind in _CELL_COLUMNS)},
    options TEXT,
    status TEXT NOT NULL,
    message TEXT,
    metrics TEXT,
    provenance TEXT,
    wall_s REAL,
    started_at TEXT,
    finished_at TEXT,
    run_id TEXT
);
CREATE INDEX IF NOT EXISTS results_by_attention ON results(attention, pattern, kind);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    config TEXT,
    command TEXT,
    started_at TEXT,
    finished_at TEXT,
    cells_planned INTEGER,
    cells_run INTEGER,
    state TEXT,
    provenance TEXT
);
"""


class StoreError(RuntimeError):
    """The store file is damaged or was written by an incompatible cab."""


class ResultStore:
    """SQLite results store; use as a context manager or call close()."""

    def __init__(self, path: "str | Path"):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(self.path, timeout=30)
        self._conn.row_factory = sqlite3.Row
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            ok = self._conn.execute("PRAGMA quick_check").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path} is not a readable cab results store ({exc}); move it aside") from exc
        if ok != "ok":
            raise StoreError(f"{self.path} failed SQLite's integrity check ({ok}); restore or move it aside")
        version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} was written by a newer cab (store schema {version}, this cab reads {SCHEMA_VERSION}); "
                "upgrade cab or choose another --db"
            )
        with self._conn:
            self._conn.executescript(_SCHEMA)
            self._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    # writing --------------------------------------------------------------------------------------

    def put(self, result: Result, run_id: "str | None" = None) -> None:
        """Insert or replace the row of result's cell, in its own transaction."""
        cell = result.cell
        values = {name: getattr(cell, name) for name, _ in _CELL_COLUMNS}
        for name in _JSON_CELL_FIELDS:
            values[name] = json.dumps(values[name], sort_keys=True)
        values.update(
            key=cell.key, options=json.dumps(cell.options, sort_keys=True), status=result.status.value,
            message=result.message, metrics=json.dumps(result.metrics, allow_nan=False),
            provenance=json.dumps(result.provenance), wall_s=result.wall_s, started_at=result.started_at,
            finished_at=result.finished_at, run_id=run_id, label=cell.display_name,
        )
        columns = ", ".join(values)
        placeholders = ", ".join(f":{k}" for k in values)
        with self._conn:
            self._conn.execute(f"INSERT OR REPLACE INTO results ({columns}) VALUES ({placeholders})", values)

    def start_run(self, config: str, command: str, cells_planned: int, provenance: dict) -> str:
        """Record the start of a grid run; returns its id."""
        run_id = uuid.uuid4().hex[:12]
        with self._conn:
            self._conn.execute(
                "INSERT INTO runs (run_id, config, command, started_at, cells_planned, cells_run, state, provenance) "
                "VALUES (?, ?, ?, datetime('now'), ?, 0, 'running', ?)",
                (run_id, config, command, cells_planned, json.dumps(provenance)),
            )
        return run_id

    def finish_run(self, run_id: str, cells_run: int, state: str) -> None:
        """Record how a run ended: 'finished' or 'interrupted'."""
        with self._conn:
            self._conn.execute(
                "UPDATE runs SET finished_at = datetime('now'), cells_run = ?, state = ? WHERE run_id = ?",
                (cells_run, state, run_id),
            )

    # reading --------------------------------------------------------------------------------------

    def finished_keys(self, keys: "Iterable[str] | None" = None) -> "set[str]":
        """Keys that already have a result (all of them, or those among `keys`)."""
        rows = self._conn.execute("SELECT key FROM results").fetchall()
        present = {r[0] for r in rows}
        return present if keys is None else present & set(keys)

    def keys_with_status(self, statuses: "Iterable[Status]") -> "set[str]":
        wanted = [s.value for s in statuses]
        marks = ", ".join("?" for _ in wanted)
        return {r[0] for r in self._conn.execute(f"SELECT key FROM results WHERE status IN ({marks})", wanted)}

    def _row_to_result(self, row: sqlite3.Row) -> Result:
        cell_data = {name: row[name] for name, _ in _CELL_COLUMNS}
        cell_data["hparams"] = json.loads(row["hparams"] or "{}")
        cell_data["options"] = json.loads(row["options"] or "{}")
        return Result(
            cell=Cell.from_dict(cell_data), status=Status(row["status"]), metrics=json.loads(row["metrics"] or "{}"),
            message=row["message"] or "", provenance=json.loads(row["provenance"] or "{}"),
            wall_s=row["wall_s"] or 0.0, started_at=row["started_at"] or "", finished_at=row["finished_at"] or "",
        )

    def get(self, key: str) -> "Result | None":
        row = self._conn.execute("SELECT * FROM results WHERE key = ?", (key,)).fetchone()
        return None if row is None else self._row_to_result(row)

    def results(self) -> "list[Result]":
        rows = self._conn.execute("SELECT * FROM results ORDER BY attention, pattern, kind, lq, mode").fetchall()
        return [self._row_to_result(r) for r in rows]

    def count(self) -> int:
        return self._conn.execute("SELECT COUNT(*) FROM results").fetchone()[0]

    def dataframe(self) -> pd.DataFrame:
        """One row per result; scalar metrics are flattened into `m_<name>` columns, JSON fields parsed."""
        df = pd.read_sql_query("SELECT * FROM results ORDER BY attention, pattern, kind, lq, mode", self._conn)
        if df.empty:
            return df
        for column in ("hparams", "options", "metrics", "provenance"):
            df[column] = df[column].map(lambda s: json.loads(s) if isinstance(s, str) and s else {})
        scalars = pd.DataFrame(
            [{f"m_{k}": v for k, v in m.items() if isinstance(v, (int, float, str, bool)) or v is None}
             if isinstance(m, dict) else {} for m in df["metrics"]],
            index=df.index,
        )
        return pd.concat([df, scalars], axis=1)

    def runs_dataframe(self) -> pd.DataFrame:
        return pd.read_sql_query("SELECT * FROM runs ORDER BY started_at", self._conn)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> "ResultStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
