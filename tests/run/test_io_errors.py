"""I/O errors and read-only readers (issue 21, items 6 and 7): every unusable --db or --out is one line
`cab: error: ...` naming the path, exit status 2, found before any cell runs; a full disk is a clean error
that keeps every stored result; exports are written atomically; `cab report`, `export` and `analyze` open
the store read-only (nothing written, no WAL switch, no schema in an empty file); a store whose index
disagrees with its table is refused."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from cab.cells import Cell, Result
from cab.cli import main
from cab.status import Status
from cab.store import ResultStore, StoreError
from tests.paths import ROOT


def result(i: int, message: str = "") -> Result:
    return Result(Cell(kind="bench", attention="vanilla", pattern="NS", lq=8 + i, lk=8 + i, mode="fwd"), Status.OK,
                  metrics={"median_ms": 1.0, "p20_ms": 0.9, "p80_ms": 1.1}, message=message)


def store(path: Path, n: int = 3) -> Path:
    with ResultStore(path) as s:
        for i in range(n):
            s.put(result(i))
    return path


def one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("cab: error: ") and "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture
def smoke(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(ROOT / "configs" / "smoke.yaml", tmp_path / "smoke.yaml")
    return "smoke.yaml"


def run(db, out="board") -> int:
    return main(["run", "smoke.yaml", "--db", str(db), "--out", str(out), "--no-progress"])


def test_db_a_directory(smoke, tmp_path, capsys):
    (tmp_path / "d").mkdir()
    assert run(tmp_path / "d") == 2
    one_line_error(capsys, str(tmp_path / "d"), "is a directory")


def test_db_dev_null(smoke, capsys):
    assert run("/dev/null") == 2
    one_line_error(capsys, "/dev/null", "not a regular file")


def test_db_under_a_regular_file(smoke, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert run(tmp_path / "f" / "cab.sqlite") == 2
    one_line_error(capsys, str(tmp_path / "f"))


def _as_unprivileged(monkeypatch) -> None:
    """Permissions as a non-root user sees them: root may write anywhere, so under root the test asks
    os.access (what cab consults before opening) the way the modes say, not the way root would."""
    if os.geteuid() != 0:
        return
    real = os.access

    def access(path, mode, *args, **kwargs):
        wanted = {os.W_OK: 0o200, os.X_OK: 0o100, os.R_OK: 0o400}
        bits = os.stat(path).st_mode
        if any(mode & flag and not bits & owner for flag, owner in wanted.items()):
            return False
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)


def test_db_in_an_unwritable_folder_and_a_read_only_store(smoke, tmp_path, capsys, monkeypatch):
    _as_unprivileged(monkeypatch)
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    assert run(folder / "cab.sqlite") == 2
    one_line_error(capsys, str(folder), "writable")
    db = store(tmp_path / "s.sqlite")
    db.chmod(0o444)
    assert run(db) == 2
    one_line_error(capsys, str(db), "read-only")


def test_a_full_disk_is_a_clean_error_that_keeps_every_result(tmp_path):
    db = store(tmp_path / "cab.sqlite", 3)
    with ResultStore(db) as s:
        pages = s._conn.execute("PRAGMA page_count").fetchone()[0]
        s._conn.execute(f"PRAGMA max_page_count = {pages}")  # SQLite's own 'database or disk is full'
        with pytest.raises(StoreError, match="cannot write to the results store .*full.*rerun the same command"):
            s.put(result(99, message="x" * 200_000))
    with ResultStore(db) as s:
        assert s.count() == 3


def test_out_a_file_or_under_a_file_is_refused_before_any_cell_runs(smoke, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    for out in (tmp_path / "f", tmp_path / "f" / "board"):
        assert run(tmp_path / "cab.sqlite", out) == 2
        one_line_error(capsys, str(tmp_path / "f"))
        assert not (tmp_path / "cab.sqlite").exists()  # no cell ran, no store was even opened
    assert main(["report", "--db", str(store(tmp_path / "s.sqlite")), "--out", str(tmp_path / "f")]) == 2
    one_line_error(capsys, str(tmp_path / "f"))


def test_export_out_a_folder_or_under_a_file(tmp_path, capsys):
    db = store(tmp_path / "cab.sqlite")
    assert main(["export", "--format", "csv", "--db", str(db), "--out", str(tmp_path)]) == 2
    one_line_error(capsys, str(tmp_path), "folder")
    (tmp_path / "f").write_text("x")
    assert main(["export", "--format", "csv", "--db", str(db), "--out", str(tmp_path / "f" / "x.csv")]) == 2
    one_line_error(capsys, str(tmp_path / "f"))


def test_exports_are_written_atomically(tmp_path, capsys, monkeypatch):
    import pandas as pd

    db = store(tmp_path / "cab.sqlite")
    out = tmp_path / "cab.csv"
    out.write_text("the previous export\n")

    def full_disk(self, path, *args, **kwargs):
        Path(path).write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(pd.DataFrame, "to_csv", full_disk)
    assert main(["export", "--format", "csv", "--db", str(db), "--out", str(out)]) == 2
    one_line_error(capsys, str(out), "No space left on device")
    assert out.read_text() == "the previous export\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cab.csv", "cab.sqlite"]  # no temporary file left


def test_report_tables_are_written_atomically(tmp_path, monkeypatch):
    import pandas as pd

    from cab.report import ReportError
    from cab.report.export import write_exports

    folder = tmp_path / "tables"
    folder.mkdir()
    (folder / "t.csv").write_text("before\n")
    real = Path.write_text

    def full_disk(self, text, *args, **kwargs):
        real(self, text[:3], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(ReportError, match="No space left"):
        write_exports(tmp_path, [("t", "T", pd.DataFrame({"a": [1]}))])
    monkeypatch.undo()
    assert (folder / "t.csv").read_text() == "before\n" and sorted(p.name for p in folder.iterdir()) == ["t.csv"]


# readers -------------------------------------------------------------------------------------------

def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_readers_write_nothing(tmp_path, capsys):
    db = store(tmp_path / "cab.sqlite")
    with sqlite3.connect(db) as conn:  # a store in rollback-journal mode must stay so
        conn.execute("PRAGMA journal_mode=DELETE")
    before = digest(db)
    assert main(["report", "--db", str(db), "--out", str(tmp_path / "site"), "--fidelity-budget", "0"]) == 0
    assert main(["export", "--format", "json", "--db", str(db), "--out", str(tmp_path / "x.json")]) == 0
    assert main(["analyze", "--db", str(db), "--bootstrap", "0"]) == 0
    assert digest(db) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("cab.sqlite")) == ["cab.sqlite"]


def test_report_on_an_empty_file_leaves_it_empty(tmp_path, capsys):
    db = tmp_path / "empty.sqlite"
    db.touch()
    assert main(["report", "--db", str(db), "--out", str(tmp_path / "site")]) == 2
    one_line_error(capsys, str(db))
    assert db.stat().st_size == 0
    assert main(["analyze", "--db", str(db)]) == 2
    one_line_error(capsys, str(db))
    assert db.stat().st_size == 0


def test_a_missing_store_is_a_clean_error_for_every_reader(tmp_path, capsys):
    missing = tmp_path / "none.sqlite"
    for argv in (["report", "--out", str(tmp_path / "site")], ["export", "--format", "csv"], ["analyze"]):
        assert main([*argv, "--db", str(missing)]) == 2
        one_line_error(capsys, str(missing))
    assert not missing.exists()


def test_a_read_only_store_in_a_read_only_folder_can_be_read(tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    db = store(folder / "cab.sqlite")  # left in WAL mode, as cab run leaves it
    db.chmod(0o444)
    folder.chmod(0o555)
    try:
        assert main(["report", "--db", str(db), "--out", str(tmp_path / "site"), "--fidelity-budget", "0"]) == 0
        assert main(["export", "--format", "csv", "--db", str(db), "--out", str(tmp_path / "x.csv")]) == 0
        assert sorted(p.name for p in folder.iterdir()) == ["cab.sqlite"]
    finally:
        folder.chmod(0o755)


def test_an_older_schema_is_read_without_migrating_the_file(tmp_path):
    db = store(tmp_path / "cab.sqlite")
    with sqlite3.connect(db) as conn:
        conn.execute("DROP INDEX results_by_slot")
        conn.execute("ALTER TABLE results DROP COLUMN slot")
        conn.execute("PRAGMA user_version = 2")
    before = digest(db)
    with ResultStore(db, readonly=True) as s:
        assert s.count() == 3 and s.migrated_from is None
    assert digest(db) == before and not list(tmp_path.glob("*.bak"))


def test_an_index_that_disagrees_with_its_table_is_refused(tmp_path, capsys):
    db = store(tmp_path / "cab.sqlite", 20)
    with sqlite3.connect(db) as conn:  # the index's b-tree holds statuses, the schema now says messages
        conn.execute("PRAGMA writable_schema=ON")
        conn.execute("UPDATE sqlite_master SET sql = 'CREATE INDEX results_by_status ON results(message)' "
                     "WHERE name = 'results_by_status'")
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA quick_check").fetchone()[0] == "ok"  # what cab checked before
    for readonly in (False, True):
        with pytest.raises(StoreError, match="integrity check"):
            ResultStore(db, readonly=readonly)
    assert main(["report", "--db", str(db), "--out", str(tmp_path / "site")]) == 2
    one_line_error(capsys, "integrity check")
