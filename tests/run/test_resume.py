"""The driver: a run killed (SIGKILL) or interrupted (SIGINT) mid-grid keeps every finished cell, and
rerunning the same command runs only what is left; force reruns everything, retry_failed only failures."""

import json
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cab.cells import Result
from cab.executors import procfs
from cab.grid import expand
from cab.run import run_grid
from cab.status import Status
from cab.store import ResultStore, StoreBusy
from tests.paths import ROOT

# The driver takes SIGINT as a terminal's Ctrl-C would: a shell without job control starts background
# commands (a CI runner's, say) with SIGINT ignored, which children inherit and Python then leaves ignored.
DRIVER = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
          "from cab.run import run_grid; "
          "print(run_grid(sys.argv[1], db=sys.argv[2], render=False, progress=False))")


def _config(tmp_path, lengths, min_run_time_s=0.05, name="resume.yaml", executor="local"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(f"""\
        name: resume
        attentions: [vanilla]
        patterns: [NS]
        threads: 1
        bench:
          lengths: {list(lengths)}
          heads: 2
          head_dim: 8
          modes: [fwd]
          min_run_time_s: {min_run_time_s}
          memory: false
        executor: {{kind: {executor}, timeout_s: 120}}
        """))
    return path


def _start(config, db, env=None):
    return subprocess.Popen([sys.executable, "-c", DRIVER, str(config), str(db)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _rows(db) -> "dict[str, tuple]":
    """key -> (run_id, started_at, finished_at, status), read without disturbing the writer."""
    if not Path(db).exists():
        return {}
    conn = sqlite3.connect(db, timeout=10)
    try:
        rows = conn.execute("SELECT key, run_id, started_at, finished_at, status FROM results").fetchall()
    except sqlite3.OperationalError:  # the driver has not created the table yet
        return {}
    finally:
        conn.close()
    return {r[0]: tuple(r[1:]) for r in rows}


def _runs(db) -> "list[tuple]":
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT run_id, state, cells_planned, cells_run FROM runs ORDER BY rowid").fetchall()
    finally:
        conn.close()


def _signal_after(proc, db, rows: int, signum: int, descendants: "list[int] | None" = None,
                  ) -> "tuple[dict[str, tuple], str]":
    """Send `signum` to the driver once at least `rows` results are stored; return the rows it left and
    its stderr. `descendants` receives the driver's process tree as it was just before the signal."""
    deadline = time.monotonic() + 120
    while len(_rows(db)) < rows:
        if proc.poll() is not None:
            pytest.fail(f"driver ended before {rows} rows were stored:\n{proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("driver stored too few rows in 120 s")
        time.sleep(0.02)
    if descendants is not None:
        descendants.extend(procfs.tree(proc.pid)[1:])
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    return _rows(db), stderr


def _state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "gone"
    return stat[stat.rindex(")") + 2]


def _gone(pids: "list[int]", within_s: float = 10.0) -> bool:
    """True once none of `pids` runs any more (exited, or a zombie waiting for its parent)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if all(_state(pid) in ("gone", "Z") for pid in pids):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("executor", ["local", "subprocess", "pool"])
def test_sigkill_mid_run_then_rerun_resumes(tmp_path, executor, killed_driver_env):
    config = _config(tmp_path, range(16, 16 + 8 * 8, 8), executor=executor)
    db = tmp_path / "cab.sqlite"
    keys = {c.key for c in expand(config)}
    proc = _start(config, db, killed_driver_env)
    descendants: list = []
    before, _ = _signal_after(proc, db, 3, signal.SIGKILL, descendants)
    assert proc.returncode == -signal.SIGKILL
    assert 3 <= len(before) < len(keys), "the kill must land mid-run"
    assert _gone(descendants), "a process the killed driver started is still running"
    with ResultStore(db) as reader:  # a reader sees that the run's driver is gone (and writes nothing)
        assert reader.runs_dataframe()["state"].tolist() == ["killed"]
    assert _runs(db)[0][1] == "running"

    rerun = subprocess.run([sys.executable, "-c", DRIVER, str(config), str(db)], cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    after = _rows(db)
    assert set(after) == keys  # one row per key (the key is the primary key), none missing, none extra
    for key, row in before.items():
        assert after[key] == row  # same run id and timestamps: kept, not rerun
    assert all(row[3] == "ok" for row in after.values()), after
    killed, resumed = _runs(db)
    # it never got to record its end: the next writer recorded it killed, with the cells it stored
    assert killed[1:] == ("killed", len(keys), len(before))
    # the rerun planned and ran exactly the cells the killed run had not finished: none ran twice
    assert resumed[1:] == ("finished", len(keys) - len(before), len(keys) - len(before))
    assert {row[0] for key, row in after.items() if key not in before} == {resumed[0]}
    assert f"{len(before)} already done" in rerun.stdout


def test_a_second_run_on_the_same_store_is_refused(tmp_path):
    config, db = _config(tmp_path, [8], min_run_time_s=0.01), tmp_path / "cab.sqlite"
    with ResultStore(db) as holder, holder.writer_lock():
        with pytest.raises(StoreBusy, match="another cab run is writing"):
            run_grid(config, db=db, render=False, progress=False)
    assert run_grid(config, db=db, render=False, progress=False).run == 1  # released with the first


@pytest.mark.parametrize("executor", ["local", "pool"])
def test_sigint_marks_the_run_interrupted_and_keeps_finished_cells(tmp_path, executor):
    # cells that take >= 0.4 s each (lengths where 0.4 s needs fewer than the runner's 1000-sample cap, and
    # the gate is cached after the first cell): the 4 left after the second cannot finish before the signal
    config = _config(tmp_path, range(256, 256 + 64 * 6, 64), min_run_time_s=0.4, executor=executor)
    db = tmp_path / "cab.sqlite"
    proc = _start(config, db)
    kept, stderr = _signal_after(proc, db, 2, signal.SIGINT)
    assert proc.returncode == -signal.SIGINT, stderr  # the KeyboardInterrupt was re-raised
    ((run_id, state, planned, cells_run),) = _runs(db)
    assert state == "interrupted" and cells_run == len(kept) and planned == 6
    assert all(row[0] == run_id and row[3] == "ok" for row in kept.values())
    assert f"interrupted after {len(kept)} of 6 cells" in stderr
    assert f"resume with: cab run {config}" in stderr


def test_force_and_retry_failed(tmp_path):
    config, db = _config(tmp_path, [8, 12], min_run_time_s=0.01), tmp_path / "cab.sqlite"
    first = run_grid(config, db=db, render=False, progress=False)
    assert (first.planned, first.skipped, first.run, first.counts) == (2, 0, 2, {"ok": 2})
    # where the time went: the bench phase (2 cells, their seconds, its wall time) and the slowest cells
    (n, total, start, end), = first.timeline.kinds.values()
    assert n == 2 and 0 < total and end >= start and "bench" in first.timeline.kinds
    text = str(first)
    assert "time: start-up " in text and "; bench 2 cells " in text and "leaderboard 0.0 s" in text
    assert text.count(" fwd (ok) ") == 2 and "slowest cells: " in text

    again = run_grid(config, db=db, render=False, progress=False)
    assert (again.skipped, again.run) == (2, 0)

    failed_cell, fine_cell = expand(config)
    with ResultStore(db) as store:
        store.put(Result(cell=failed_cell, status=Status.ERROR, message="boom"), run_id="earlier")
    retried = run_grid(config, db=db, retry_failed=True, render=False, progress=False)
    assert (retried.skipped, retried.run) == (1, 1)
    rows = _rows(db)
    assert rows[failed_cell.key][0] == retried.run_id and rows[failed_cell.key][3] == "ok"
    assert rows[fine_cell.key][0] == first.run_id

    forced = run_grid(config, db=db, force=True, render=False, progress=False)
    assert (forced.skipped, forced.run) == (0, 2)
    assert {row[0] for row in _rows(db).values()} == {forced.run_id}
    assert [r[1] for r in _runs(db)] == ["finished"] * 4


def test_incorrect_is_not_retried(tmp_path):
    config, db = _config(tmp_path, [8], min_run_time_s=0.01), tmp_path / "cab.sqlite"
    (cell,) = expand(config)
    with ResultStore(db) as store:
        store.put(Result(cell=cell, status=Status.INCORRECT, message="leaks the future"), run_id="earlier")
    summary = run_grid(config, db=db, retry_failed=True, render=False, progress=False)
    assert (summary.skipped, summary.run) == (1, 0)


def test_report_rendered_or_skipped_with_a_message(tmp_path, monkeypatch, capsys):
    config, db = _config(tmp_path, [8], min_run_time_s=0.01), tmp_path / "cab.sqlite"
    out = tmp_path / "board"
    summary = run_grid(config, db=db, report_dir=out, progress=False)
    assert summary.report == out / "index.html" and summary.report.is_file()
    assert "leaderboard:" in str(summary)

    monkeypatch.setitem(sys.modules, "cab.report", None)  # as in a checkout without cab.report
    skipped = run_grid(config, db=db, report_dir=tmp_path / "other", progress=False)
    assert skipped.report is None and "cab.report is not available" in skipped.note
    assert "leaderboard not rendered" in capsys.readouterr().err


def test_a_run_left_running_is_recorded_killed_only_once_its_driver_is_gone(tmp_path):
    db = tmp_path / "cab.sqlite"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with ResultStore(db) as store:
            mine = store.start_run("a.yaml", "cab run a.yaml", 3, {})  # this process: alive
            other = store.start_run("b.yaml", "cab run b.yaml", 3, {})
            legacy = store.start_run("c.yaml", "cab run c.yaml", 3, {})
            store._conn.execute("UPDATE runs SET provenance = ? WHERE run_id = ?",
                                (json.dumps({"driver": {"host": socket.gethostname(), "pid": sleeper.pid}}), other))
            store._conn.execute("UPDATE runs SET provenance = '{}' WHERE run_id = ?", (legacy,))
        with ResultStore(db) as store:
            states = dict(store.runs_dataframe()[["run_id", "state"]].values.tolist())
            # a reader knows only about drivers on this host; the legacy run may belong to a live writer
            assert (states[mine], states[other], states[legacy]) == ("running", "running", "running")
        sleeper.kill()
        sleeper.wait()
        with ResultStore(db) as store:
            assert dict(store.runs_dataframe()[["run_id", "state"]].values.tolist())[other] == "killed"
            with store.writer_lock():  # the writer lock is free: no other cab run writes, the legacy run is over
                pass
        assert {run_id: state for run_id, state, *_ in _runs(db)} == {mine: "running", other: "killed",
                                                                      legacy: "killed"}
    finally:
        sleeper.kill()
