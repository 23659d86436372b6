"""The results store: WAL and a committed transaction per result, integrity and version checks on open
with messages that say what to do, and the migration of a schema-1 store (written here with schema 1's
own DDL and row layout) to the current schema, all or nothing, with a backup."""

import json
import sqlite3

import pytest

from cab.cells import Cell, Result
from cab.status import Status
from cab.store import MIGRATIONS, SCHEMA_VERSION, ResultStore, StoreError

# Schema 1 exactly as cab wrote it (cab/store.py before schema 2)
SCHEMA_1 = """
CREATE TABLE IF NOT EXISTS results (
    key TEXT PRIMARY KEY,
    kind TEXT, attention TEXT, label TEXT, hparams TEXT, pattern TEXT, batch INTEGER, heads INTEGER,
    kv_heads INTEGER, lq INTEGER, lk INTEGER, head_dim INTEGER, dtype TEXT, device TEXT, mode TEXT, seed INTEGER,
    options TEXT, status TEXT NOT NULL, message TEXT, metrics TEXT, provenance TEXT, wall_s REAL,
    started_at TEXT, finished_at TEXT, run_id TEXT
);
CREATE INDEX IF NOT EXISTS results_by_attention ON results(attention, pattern, kind);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, config TEXT, command TEXT, started_at TEXT, finished_at TEXT,
    cells_planned INTEGER, cells_run INTEGER, state TEXT, provenance TEXT
);
PRAGMA user_version = 1;
"""

CELLS = [
    Cell(kind="bench", attention="memory_efficient", pattern="CS", hparams={"query_chunk_size": 16}, lq=128,
         lk=128, mode="fwd", label="me-16", options={"threads": 1, "min_run_time_s": 0.1}),
    Cell(kind="check", attention="vanilla", pattern="NC", lq=64, lk=96, seed=3),
]


def _write_schema_1(path, cells):
    """A store as schema-1 cab wrote it: flat columns, `label` holding the display name."""
    conn = sqlite3.connect(path)
    conn.executescript(SCHEMA_1)
    for cell in cells:
        conn.execute(
            "INSERT INTO results (key, kind, attention, label, hparams, pattern, batch, heads, kv_heads, lq, lk, "
            "head_dim, dtype, device, mode, seed, options, status, message, metrics, provenance, wall_s, "
            "started_at, finished_at, run_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'ok', '', "
            "?, '{}', 1.5, '2026-01-01T00:00:00', '2026-01-01T00:00:01', 'old')",
            (cell.key, cell.kind, cell.attention, cell.display_name, json.dumps(cell.hparams, sort_keys=True),
             cell.pattern, cell.batch, cell.heads, cell.kv_heads, cell.lq, cell.lk, cell.head_dim, cell.dtype,
             cell.device, cell.mode, cell.seed, json.dumps(cell.options, sort_keys=True), '{"median_ms": 2.0}'))
    conn.execute("INSERT INTO runs (run_id, state, cells_run) VALUES ('old', 'finished', 2)")
    conn.commit()
    conn.close()


def _user_version(path) -> int:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("PRAGMA user_version").fetchone()[0]
    finally:
        conn.close()


def test_a_new_store_is_current_and_in_wal_mode(tmp_path):
    with ResultStore(tmp_path / "s.sqlite") as store:
        assert store.migrated_from is None
        assert store._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert _user_version(tmp_path / "s.sqlite") == SCHEMA_VERSION


def test_each_result_is_committed_when_put_returns(tmp_path):
    path = tmp_path / "s.sqlite"
    with ResultStore(path) as store:
        store.put(Result(cell=CELLS[1], status=Status.OK, metrics={"x": 1}), run_id="r")
        other = sqlite3.connect(path)  # another process's view, while the writer is still open
        assert other.execute("SELECT key, status FROM results").fetchall() == [(CELLS[1].key, "ok")]
        other.close()


def test_results_round_trip_every_cell_field(tmp_path):
    with ResultStore(tmp_path / "s.sqlite") as store:
        for cell in CELLS:
            store.put(Result(cell=cell, status=Status.OK, metrics={"median_ms": 1.0}))
        assert {r.key: r.cell for r in store.results()} == {c.key: c for c in CELLS}
        df = store.dataframe()
    assert "cell" not in df.columns and set(df["label"]) == {"me-16", "vanilla"}


def test_a_schema_1_store_is_migrated_with_a_backup(tmp_path):
    path = tmp_path / "old.sqlite"
    _write_schema_1(path, CELLS)
    with ResultStore(path) as store:
        assert store.migrated_from == 1
        assert store.backup == tmp_path / "old.sqlite.schema1.bak"
        results = {r.key: r for r in store.results()}
        assert {k: r.cell for k, r in results.items()} == {c.key: c for c in CELLS}  # labels, hparams, options
        assert all(r.metrics == {"median_ms": 2.0} and r.status is Status.OK for r in results.values())
        assert store.finished_keys() == {c.key for c in CELLS}  # a rerun skips them
        assert store.runs_dataframe()[["run_id", "executor"]].values.tolist() == [["old", None]]
        store.put(Result(cell=CELLS[0], status=Status.OOM), run_id="new")
    assert _user_version(path) == SCHEMA_VERSION
    assert _user_version(store.backup) == 1  # the file as it was
    with ResultStore(path) as again:
        assert again.migrated_from is None and again.get(CELLS[0].key).status is Status.OOM


def test_a_failed_migration_leaves_the_store_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "old.sqlite"
    _write_schema_1(path, CELLS)

    def half_done(conn):
        MIGRATIONS_BEFORE[1](conn)  # every step of the real migration...
        raise sqlite3.OperationalError("disk I/O error")  # ...then a failure before the commit

    MIGRATIONS_BEFORE = dict(MIGRATIONS)
    monkeypatch.setitem(MIGRATIONS, 1, half_done)
    with pytest.raises(StoreError, match="from store schema 1 to 2 failed .*the file is unchanged"):
        ResultStore(path)
    conn = sqlite3.connect(path)
    columns = {r[1] for r in conn.execute("PRAGMA table_info(results)")}
    conn.close()
    assert _user_version(path) == 1 and "cell" not in columns


def test_a_newer_schema_is_refused_with_what_to_do(tmp_path):
    path = tmp_path / "new.sqlite"
    ResultStore(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="written by a newer cab .* upgrade cab"):
        ResultStore(path)


def test_an_unknown_old_schema_says_how_to_keep_the_results(tmp_path, monkeypatch):
    path = tmp_path / "old.sqlite"
    _write_schema_1(path, CELLS)
    monkeypatch.delitem(MIGRATIONS, 1)
    with pytest.raises(StoreError, match="cannot migrate; export it with the cab that wrote it"):
        ResultStore(path)


@pytest.mark.parametrize("setup, message", [
    ("CREATE TABLE notes (x)", "not a cab results store"),
    ("CREATE TABLE results (key TEXT); CREATE TABLE runs (x); PRAGMA user_version = 2", "lacks its tables or columns"),
])
def test_foreign_sqlite_files_are_refused(tmp_path, setup, message):
    path = tmp_path / "other.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript(setup)
    conn.close()
    with pytest.raises(StoreError, match=message) as info:
        ResultStore(path)
    assert "move it aside" in str(info.value)


def test_a_file_that_is_not_sqlite_is_refused(tmp_path):
    path = tmp_path / "junk.sqlite"
    path.write_bytes(b"this is not a database\n" * 500)
    with pytest.raises(StoreError, match="not a readable SQLite results store.*move it aside"):
        ResultStore(path)


def test_a_damaged_store_fails_the_integrity_check(tmp_path):
    path = tmp_path / "damaged.sqlite"
    with ResultStore(path) as store:
        for i in range(300):
            store.put(Result(cell=Cell(kind="check", attention="vanilla", pattern="NS", lq=i + 1), status=Status.OK,
                             message="x" * 200))
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()
    with open(path, "r+b") as f:  # scribble over the headers of the b-tree pages after the schema page
        for page in range(1, 6):
            f.seek(page * page_size)
            f.write(b"\xff" * 16)
    with pytest.raises(StoreError, match="integrity check|not a readable") as info:
        ResultStore(path)
    assert "move it aside" in str(info.value)


def test_text_utf8_cannot_encode_and_huge_integers_are_stored_not_raised(tmp_path):
    cell = Cell(kind="bench", attention="vanilla", pattern="NS", seed=2**64, label="file-\udcff")
    with ResultStore(tmp_path / "cab.sqlite") as store:
        store.put(Result(cell=cell, status=Status.ERROR, message="no such file: caf\udce9.py"))
        (stored,) = store.results()
    assert stored.message == "no such file: caf\\udce9.py" and stored.cell.seed == 2**64


def test_runs_creating_a_new_store_at_once_all_open_it(tmp_path):
    import subprocess
    import sys
    import time

    path, start = tmp_path / "new.sqlite", time.time() + 3.0
    code = ("import sys, time\nfrom cab.store import ResultStore\n"
            "time.sleep(max(0.0, float(sys.argv[2]) - time.time()))\n"
            "with ResultStore(sys.argv[1]) as store:\n    print(store.count())\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path), str(start)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(6)]
    outcomes = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, [err[-800:] for _, err in outcomes]
    assert [out.strip() for out, _ in outcomes] == ["0"] * 6 and _user_version(path) == SCHEMA_VERSION


def test_a_refused_file_is_left_as_it_was(tmp_path):
    path = tmp_path / "foreign.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript("CREATE TABLE other (x); PRAGMA user_version = 99")
    conn.close()
    before = path.read_bytes()
    with pytest.raises(StoreError, match="newer cab"):
        ResultStore(path)
    assert path.read_bytes() == before and not path.with_name("foreign.sqlite-wal").exists()
