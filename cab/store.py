"""The results store: SQLite, one row per cell upserted by key, written as each cell finishes.

WAL mode and one transaction per result mean an interrupted (even SIGKILLed) run loses no finished cell,
and the keys already present are what a rerun skips. Only the driver writes it (executors send results
back), one run at a time (`writer_lock`). Opening checks SQLite's integrity, and the schema version in
`PRAGMA user_version`: an older schema is migrated in one transaction after a backup copy of the file
is written beside it; a newer or unknown one is refused with what to do.

Schema history: 1: results + runs tables. 2: results.cell (the whole cell as JSON, so that every cell
field round-trips, including fields added after the flat columns were laid out), runs.executor, an
index by status. 3: results.slot (the cell's key without its code versions, `Cell.slot`): a result of
another version of the same measurement is stale, and storing the new one replaces it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Callable, Iterable, Iterator

import pandas as pd

from cab.cells import Cell, Result
from cab.status import Status

SCHEMA_VERSION = 3

_CELL_COLUMNS = (
    ("kind", "TEXT"), ("attention", "TEXT"), ("label", "TEXT"), ("hparams", "TEXT"), ("pattern", "TEXT"),
    ("batch", "INTEGER"), ("heads", "INTEGER"), ("kv_heads", "INTEGER"), ("lq", "INTEGER"), ("lk", "INTEGER"),
    ("head_dim", "INTEGER"), ("dtype", "TEXT"), ("device", "TEXT"), ("mode", "TEXT"), ("seed", "INTEGER"),
)
_JSON_CELL_FIELDS = {"hparams"}

_TABLES = (f"""
CREATE TABLE results (
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
    run_id TEXT,
    cell TEXT,
    slot TEXT
)""", "CREATE INDEX results_by_attention ON results(attention, pattern, kind)",
    "CREATE INDEX results_by_status ON results(status)", "CREATE INDEX results_by_slot ON results(slot)", """
CREATE TABLE runs (
    run_id TEXT PRIMARY KEY,
    config TEXT,
    command TEXT,
    started_at TEXT,
    finished_at TEXT,
    cells_planned INTEGER,
    cells_run INTEGER,
    state TEXT,
    provenance TEXT,
    executor TEXT
)""")


class StoreError(RuntimeError):
    """The store file is damaged or was written by an incompatible cab; the message says what to do."""


class StoreBusy(StoreError):
    """Another run is writing to the store."""


def _cell_json_from_columns(row: sqlite3.Row) -> str:
    """A schema-1 row's cell, rebuilt from its flat columns (label held the display name)."""
    data = {name: row[name] for name, _ in _CELL_COLUMNS}
    data["hparams"] = json.loads(row["hparams"] or "{}")
    data["options"] = json.loads(row["options"] or "{}")
    cell = Cell.from_dict(data)
    if row["label"] == cell.attention:
        data["label"] = ""  # the display name of an unlabelled cell
    return json.dumps(Cell.from_dict(data).to_dict(), sort_keys=True)


def _migrate_1_to_2(conn: sqlite3.Connection) -> None:
    conn.execute("ALTER TABLE results ADD COLUMN cell TEXT")
    conn.execute("ALTER TABLE runs ADD COLUMN executor TEXT")
    conn.execute("CREATE INDEX IF NOT EXISTS results_by_status ON results(status)")
    rows = conn.execute("SELECT * FROM results").fetchall()
    conn.executemany("UPDATE results SET cell = ? WHERE key = ?",
                     [(_cell_json_from_columns(r), r["key"]) for r in rows])


def _migrate_2_to_3(conn: sqlite3.Connection) -> None:
    conn.execute("ALTER TABLE results ADD COLUMN slot TEXT")
    conn.execute("CREATE INDEX IF NOT EXISTS results_by_slot ON results(slot)")
    rows = conn.execute("SELECT key, cell FROM results").fetchall()
    conn.executemany("UPDATE results SET slot = ? WHERE key = ?",
                     [(Cell.from_dict(json.loads(r["cell"])).slot, r["key"]) for r in rows])


def _process_start(pid: int) -> "str | None":
    """The start time of a live process (clock ticks since boot, from /proc/PID/stat), None when no such
    process runs (gone, or a zombie); "" where /proc cannot tell (the process exists)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except FileNotFoundError:
        return None
    except OSError:
        return ""
    fields = stat[stat.rindex(")") + 2:].split()
    return None if fields[0] in ("Z", "X") else fields[19]


def _driver() -> dict:
    """Who writes a run: the host, pid and start time of this process (to tell later whether it still runs)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _process_start(os.getpid())}


def _driver_gone(provenance: "str | None", locked: bool) -> bool:
    """Whether the driver of a run recorded as running has ended. Known only on its own host (its pid is
    gone, or now belongs to a process started at another time); with the writer lock held (`locked`), no
    other `cab run` writes the store, so a run of another host, or one that recorded no driver, is over too."""
    try:
        driver = json.loads(provenance or "{}").get("driver") or {}
    except (ValueError, AttributeError):
        driver = {}
    if driver.get("host") != socket.gethostname() or not isinstance(driver.get("pid"), int):
        return locked
    start = _process_start(driver["pid"])
    return start is None or bool(start and driver.get("start") and start != driver["start"])


# version -> the step that brings a store of that version to the next one
MIGRATIONS: "dict[int, Callable[[sqlite3.Connection], None]]" = {1: _migrate_1_to_2, 2: _migrate_2_to_3}


def _storable(value: object) -> object:
    """`value` as SQLite stores it without error: text re-encoded with backslash escapes where UTF-8 cannot
    encode it, an integer beyond 64 bits as its decimal text (the cell JSON keeps the number)."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, int) and not isinstance(value, bool) and not -2**63 <= value < 2**63:
        return str(value)
    return value


# schema version -> the results columns a store of that version must have
_REQUIRED = {1: {"key", "status"}, 2: {"key", "status", "cell"}, 3: {"key", "status", "cell", "slot"}}


def _columns(conn: sqlite3.Connection, table: str) -> "set[str]":
    return {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}


class ResultStore:
    """SQLite results store; use as a context manager or call close(). `migrated_from` and `backup` say
    whether opening it migrated an older schema, and where the copy of the file from before is."""

    def __init__(self, path: "str | Path", readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        self.migrated_from: "int | None" = None
        self.backup: "Path | None" = None
        self._lock_file = None
        self._check_path()
        try:
            if readonly:
                self._conn = self._connect_readonly()
            else:
                self._conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)  # explicit transactions
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the results store {self.path} ({exc}); {self._what_to_do()}") from None
        self._conn.row_factory = sqlite3.Row
        try:
            self._open()
        except sqlite3.OperationalError as exc:  # unwritable file or folder, full disk, locked
            self._conn.close()
            raise StoreError(f"cannot open the results store {self.path} ({exc}); {self._what_to_do()}") from None
        except BaseException:
            self._conn.close()
            raise

    def _what_to_do(self) -> str:
        if self.readonly:
            return "check that the file is readable, or choose another --db"
        return ("check that the file and its folder are writable and the disk has space, or choose another "
                "--db")

    def _check_path(self) -> None:
        """A clear StoreError for a path that cannot hold a store: a directory, a device or other non-regular
        file, a folder that cannot be created or written, a missing store to read."""
        path = self.path
        if path.is_dir():
            raise StoreError(f"{path} is a directory, not a results store; give a file path such as "
                             f"{path / 'cab.sqlite'}")
        if path.exists() and not path.is_file():
            raise StoreError(f"{path} is not a regular file (a device, socket or pipe); give a file path such as "
                             "results/cab.sqlite")
        if self.readonly:
            if not path.exists():
                raise StoreError(f"no results store at {path}: run `cab run CONFIG` or `cab bench --db` first")
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the folder of the results store {path} "
                             f"({exc.strerror or exc}: {exc.filename or path.parent}); choose another --db") from None
        if path.exists() and not os.access(path, os.W_OK):
            raise StoreError(f"the results store {path} is read-only; make it writable (chmod u+w {path}) or "
                             "choose another --db (cab report, export and analyze read it as it is)")
        if not os.access(path.parent, os.W_OK | os.X_OK):
            raise StoreError(f"cannot write to the folder of the results store {path.parent}; make it writable "
                             "or choose another --db")

    def _connect_readonly(self) -> sqlite3.Connection:
        """A read-only connection (SQLite's mode=ro: no schema, no journal switch). A store with no write-ahead
        log beside it holds everything in the file: it is read as it is (immutable), so that a WAL-mode store
        gets no -shm/-wal files created beside it either (and reads in a read-only folder); one with a log
        (a run is writing it) is read through the log, or as it is where SQLite cannot open the log."""
        uri = self.path.resolve().as_uri()
        if not self.path.with_name(self.path.name + "-wal").exists():
            return sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True, timeout=30, isolation_level=None)
        conn = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=30, isolation_level=None)
        try:
            conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
            return conn
        except sqlite3.OperationalError:
            conn.close()
        return sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True, timeout=30, isolation_level=None)

    def _open(self) -> None:
        move_aside = f"move it aside (mv {self.path} {self.path}.broken) or choose another --db"
        try:
            ok = self._conn.execute("PRAGMA integrity_check(1)").fetchone()[0]
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            tables = {r[0] for r in self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path} is not a readable SQLite results store ({exc}); {move_aside}") from None
        if ok != "ok":
            raise StoreError(f"{self.path} failed SQLite's integrity check ({ok}); restore it from a backup or "
                             f"{move_aside}")
        if version > SCHEMA_VERSION:
            raise StoreError(f"{self.path} was written by a newer cab (store schema {version}, this cab reads up to "
                             f"{SCHEMA_VERSION}); upgrade cab (pip install -U cab) or choose another --db")
        if version == 0 and tables:
            raise StoreError(f"{self.path} holds tables ({', '.join(sorted(tables))}) but no cab schema version: "
                             f"it is not a cab results store; {move_aside}")
        missing = {"results", "runs"} - tables if version else set()
        if missing or (version and not _REQUIRED.get(version, set()) <= _columns(self._conn, "results")):
            raise StoreError(f"{self.path} claims store schema {version} but lacks its tables or columns; "
                             f"{move_aside}")
        if self.readonly:
            self._open_readonly(version, tables)
            return
        if version == 0:  # a new store: another process may be creating it at this moment too
            self._transaction(lambda conn: [conn.execute(statement) for statement in _TABLES], expect=0)
        elif version < SCHEMA_VERSION:
            self._migrate(version)
        self._pragma("PRAGMA journal_mode=WAL")  # only once the file is known to be a cab store
        self._pragma("PRAGMA synchronous=NORMAL")

    def _open_readonly(self, version: int, tables: "set[str]") -> None:
        """A store to read: an empty file is no store (and stays empty); an older schema is migrated in a
        copy in memory, never in the file."""
        if version == 0:
            raise StoreError(f"{self.path} holds no cab results store (an empty file); run `cab run CONFIG` "
                             "with this --db first")
        if version < SCHEMA_VERSION:
            if any(v not in MIGRATIONS for v in range(version, SCHEMA_VERSION)):
                raise StoreError(f"{self.path} has store schema {version}, which this cab cannot read")
            copy = sqlite3.connect(":memory:", isolation_level=None)
            copy.row_factory = sqlite3.Row
            self._conn.backup(copy)
            self._conn.close()
            self._conn = copy
            for step in range(version, SCHEMA_VERSION):
                self._transaction(MIGRATIONS[step], step + 1, expect=step)

    def _pragma(self, statement: str, wait_s: float = 30.0) -> None:
        """Run a PRAGMA, retrying while another connection holds the lock it needs (journal_mode does not
        wait for the busy timeout)."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                self._conn.execute(statement)
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _transaction(self, work: "Callable[[sqlite3.Connection], object]", version: int = SCHEMA_VERSION,
                     expect: "int | None" = None) -> bool:
        """Run `work` and set the schema version in one transaction (all or nothing). With `expect`, only if
        the file is still at schema `expect` once the write lock is held (another process may have done the
        work meanwhile): False when it was not."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            if expect is not None and self._conn.execute("PRAGMA user_version").fetchone()[0] != expect:
                self._conn.execute("ROLLBACK")
                return False
            work(self._conn)
            self._conn.execute(f"PRAGMA user_version = {version}")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")
        return True

    def _migrate(self, version: int) -> None:
        """Bring a store of schema `version` to SCHEMA_VERSION, one step per transaction, after a backup."""
        if any(v not in MIGRATIONS for v in range(version, SCHEMA_VERSION)):
            raise StoreError(f"{self.path} has store schema {version}, which this cab cannot migrate; export it "
                             f"with the cab that wrote it (cab export --db {self.path} --format csv) and start "
                             "a new store")
        self.backup = self.path.with_name(f"{self.path.name}.schema{version}.bak")
        with contextlib.closing(sqlite3.connect(self.backup)) as copy:
            self._conn.backup(copy)
        for step in range(version, SCHEMA_VERSION):
            try:
                self._transaction(MIGRATIONS[step], step + 1, expect=step)
            except sqlite3.DatabaseError as exc:
                raise StoreError(f"migrating {self.path} from store schema {step} to {step + 1} failed ({exc}); "
                                 f"the file is unchanged from schema {step}, and a copy is in {self.backup}") from exc
        self.migrated_from = version

    @contextlib.contextmanager
    def writer_lock(self) -> Iterator[None]:
        """Hold the store for one writing run; StoreBusy if another process holds it. The lock is the
        operating system's (flock), so it goes away with a killed process."""
        handle = open(self.path, "rb")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise StoreBusy(f"another cab run is writing to {self.path}; wait for it to finish, or give this "
                            "run another --db") from None
        try:
            self._mark_killed_runs(locked=True)
            yield
        finally:
            handle.close()  # releases the lock

    # writing --------------------------------------------------------------------------------------

    def put(self, result: Result, run_id: "str | None" = None) -> None:
        """Insert or replace the row of result's cell, and drop the stale rows of its slot (other versions),
        in one transaction. Text that UTF-8 cannot encode (a lone surrogate from a file name) is stored
        with backslash escapes; an integer SQLite cannot hold is stored as text rather than lost."""
        cell = result.cell
        values = {name: _storable(getattr(cell, name)) for name, _ in _CELL_COLUMNS}
        for name in _JSON_CELL_FIELDS:
            values[name] = json.dumps(values[name], sort_keys=True)
        values.update(
            key=cell.key, options=json.dumps(cell.options, sort_keys=True), status=result.status.value,
            message=_storable(result.message), metrics=json.dumps(result.metrics, allow_nan=False),
            provenance=json.dumps(result.provenance), wall_s=result.wall_s, started_at=result.started_at,
            finished_at=result.finished_at, run_id=run_id, label=_storable(cell.display_name),
            cell=json.dumps(cell.to_dict(), sort_keys=True), slot=cell.slot,
        )
        columns = ", ".join(values)
        placeholders = ", ".join(f":{k}" for k in values)
        self._write(f"INSERT OR REPLACE INTO results ({columns}) VALUES ({placeholders})", values,
                    ("DELETE FROM results WHERE slot = :slot AND key != :key", {"slot": cell.slot, "key": cell.key}))

    def _write(self, statement: str, values: "dict | tuple", *more: "tuple[str, dict | tuple]") -> None:
        """Statements in one transaction: committed when this returns, rolled back if one fails. A write
        SQLite refuses (full disk, read-only file, I/O error) is a StoreError: every committed result stays."""
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                for text, arguments in ((statement, values), *more):
                    self._conn.execute(text, arguments)
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            if self._conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("ROLLBACK")
            raise StoreError(f"cannot write to the results store {self.path} ({exc}); every result stored before "
                             "is kept: free disk space or make the file writable, then rerun the same command to "
                             "resume") from None

    def _killed_runs(self, locked: bool) -> "list[str]":
        rows = self._conn.execute("SELECT run_id, provenance FROM runs WHERE state = 'running'").fetchall()
        return [r["run_id"] for r in rows if _driver_gone(r["provenance"], locked)]

    def _mark_killed_runs(self, locked: bool) -> None:
        """Record as 'killed' the runs left 'running' by a driver that ended without recording its end
        (SIGKILL, a crash, a power cut), with the cells they stored and when the last one finished."""
        for run_id in self._killed_runs(locked):
            self._write("UPDATE runs SET state = 'killed', cells_run = (SELECT COUNT(*) FROM results WHERE "
                        "run_id = :id), finished_at = (SELECT MAX(finished_at) FROM results WHERE run_id = :id) "
                        "WHERE run_id = :id AND state = 'running'", {"id": run_id})

    def start_run(self, config: str, command: str, cells_planned: int, provenance: dict,
                  executor: str = "") -> str:
        """Record the start of a grid run, with its driver (host, pid) in the provenance; returns its id."""
        provenance = {**provenance, "driver": _driver()}
        run_id = uuid.uuid4().hex[:12]
        self._write(
            "INSERT INTO runs (run_id, config, command, started_at, cells_planned, cells_run, state, provenance, "
            "executor) VALUES (?, ?, ?, datetime('now'), ?, 0, 'running', ?, ?)",
            (run_id, config, command, cells_planned, json.dumps(provenance), executor),
        )
        return run_id

    def finish_run(self, run_id: str, cells_run: int, state: str) -> None:
        """Record how a run ended: 'finished' or 'interrupted' ('killed' is recorded by the next writer)."""
        self._write("UPDATE runs SET finished_at = datetime('now'), cells_run = ?, state = ? WHERE run_id = ?",
                    (cells_run, state, run_id))

    # reading --------------------------------------------------------------------------------------

    def finished_keys(self, keys: "Iterable[str] | None" = None) -> "set[str]":
        """Keys that already have a result (all of them, or those among `keys`)."""
        rows = self._conn.execute("SELECT key FROM results").fetchall()
        present = {r[0] for r in rows}
        return present if keys is None else present & set(keys)

    def stale_keys(self, cells: "Iterable[Cell]") -> "set[str]":
        """Keys among `cells` whose slot holds a result of other code versions (and none of theirs)."""
        stored: dict[str, set] = {}
        for key, slot in self._conn.execute("SELECT key, slot FROM results WHERE slot IS NOT NULL"):
            stored.setdefault(slot, set()).add(key)
        return {c.key for c in cells if c.slot in stored and c.key not in stored[c.slot]}

    def keys_with_status(self, statuses: "Iterable[Status]") -> "set[str]":
        wanted = [s.value for s in statuses]
        marks = ", ".join("?" for _ in wanted)
        return {r[0] for r in self._conn.execute(f"SELECT key FROM results WHERE status IN ({marks})", wanted)}

    def _row_to_result(self, row: sqlite3.Row) -> Result:
        return Result(
            cell=Cell.from_dict(json.loads(row["cell"])), status=Status(row["status"]),
            metrics=json.loads(row["metrics"] or "{}"),
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
        """One row per result; scalar metrics are flattened into `m_<name>` columns, JSON fields parsed, and
        cell fields without a column of their own (e.g. a task cell's task) added as columns."""
        df = pd.read_sql_query("SELECT * FROM results ORDER BY attention, pattern, kind, lq, mode", self._conn)
        cells = [json.loads(c) if isinstance(c, str) and c else {} for c in df.pop("cell")]
        if df.empty:
            return df
        for column in ("hparams", "options", "metrics", "provenance"):
            df[column] = df[column].map(lambda s: json.loads(s) if isinstance(s, str) and s else {})
        extra = sorted({name for cell in cells for name in cell} - set(df.columns))
        for name in extra:
            df[name] = [cell.get(name) for cell in cells]
        scalars = pd.DataFrame(
            [{f"m_{k}": v for k, v in m.items() if isinstance(v, (int, float, str, bool)) or v is None}
             if isinstance(m, dict) else {} for m in df["metrics"]],
            index=df.index,
        )
        return pd.concat([df, scalars], axis=1)

    def runs_dataframe(self) -> pd.DataFrame:
        """The runs; one recorded as running whose driver is known to have ended shows as 'killed'."""
        runs = pd.read_sql_query("SELECT * FROM runs ORDER BY started_at", self._conn)
        killed = set(self._killed_runs(locked=False))
        if killed:
            runs.loc[runs["run_id"].isin(killed), "state"] = "killed"
        return runs

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> "ResultStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
