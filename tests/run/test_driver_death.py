"""A driver that dies takes every process it started with it (issue 21, items 1 and 9).

`cab run` under the isolating executors starts a forkserver, multiprocessing's resource tracker and the cell
processes (each in a session of its own). When the driver is SIGKILLed mid-cell none of them may stay: not
the cell (a hung cell would burn a core for ever), not the forkserver, and not a helper that holds the
driver's stdout (`cab run ... | tee log` would never see the end of its input). SIGTERM (what Slurm,
Kubernetes and systemd send first) is handled like Ctrl-C: the run is recorded `interrupted`, the command
that resumes it is printed, the executor stops what it started, and the exit status is 143.
"""

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from cab.executors import procfs
from tests.paths import PLUGINS, ROOT

CLI = "import sys; from cab.cli import main; sys.exit(main(sys.argv[1:]))"
# a cell that starts a process of its own (in its session) and then hangs where no signal reaches it
SPAWNER = textwrap.dedent("""\
    import signal, subprocess, time
    import cab

    @cab.register_attention("spawn_and_hang", patterns=("NS",), family="faulty", exact=True)
    class SpawnAndHang(cab.Attention):
        def forward(self, q, k, v, key_padding_mask=None):
            subprocess.Popen(["sleep", "600"])
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
            while True:
                time.sleep(0.05)
    """)


def _config(tmp_path: Path, executor: str, attention: str = "faulty_hang_blocked") -> Path:
    spawner = tmp_path / "spawner.py"
    spawner.write_text(SPAWNER)
    path = tmp_path / "hang.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: hang
        plugins: [{PLUGINS / 'faulty.py'}, {spawner}]
        attentions: [{attention}]
        patterns: [NS]
        threads: 1
        check: {{}}
        executor: {{kind: {executor}, timeout_s: 600, workers: 1}}
        """))
    return path


def _stat(pid: int) -> "tuple[str, int] | None":
    """(state, session id) of a process, None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[0], int(fields[3])


def _in_sessions(sessions: "set[int]") -> "set[int]":
    """Live (not zombie) processes whose session is one of `sessions`."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(int(entry))) is not None and stat[0] != "Z" and stat[1] in sessions:
            found.add(int(entry))
    return found


def _alive(pids: "set[int]") -> "set[int]":
    return {pid for pid in pids if (stat := _stat(pid)) is not None and stat[0] != "Z"}


def _start_and_wait_for_the_cell(config: Path, db: Path, env: "dict | None" = None,
                                 ) -> "tuple[subprocess.Popen, set[int], set[int]]":
    """Start `cab run` in a session of its own and wait until the hanging cell runs; returns the driver, its
    descendants and the sessions they are in (the driver's and each detached cell's)."""
    proc = subprocess.Popen([sys.executable, "-c", CLI, "run", str(config), "--db", str(db), "--no-report",
                             "--no-progress"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, env=env)
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            pytest.fail(f"the driver ended early: {proc.stderr.read().decode()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the cell did not start within 120 s")
        tree = procfs.tree(proc.pid)[1:]
        detached = [pid for pid in tree if (stat := _stat(pid)) is not None and stat[1] == pid]
        if detached and _rows_running(db):
            break
        time.sleep(0.1)
    time.sleep(2.0)  # the cell is loading its plugin and entering the hang
    tree = set(procfs.tree(proc.pid)[1:])
    sessions = {proc.pid} | {stat[1] for pid in tree if (stat := _stat(pid)) is not None}
    return proc, tree | _in_sessions(sessions), sessions


def _rows_running(db: Path) -> bool:
    try:
        with sqlite3.connect(db, timeout=5) as conn:
            return conn.execute("SELECT COUNT(*) FROM runs WHERE state = 'running'").fetchone()[0] > 0
    except sqlite3.Error:
        return False


def _reader(stream) -> threading.Event:
    """An event set once `stream` reaches its end (every writer of the pipe has closed it)."""
    done = threading.Event()

    def read() -> None:
        while stream.read(65536):
            pass
        done.set()

    threading.Thread(target=read, daemon=True).start()
    return done


def _cleanup(pids: "set[int]") -> None:
    for pid in _alive(pids):  # only processes this test started (recorded from its driver's tree and session)
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


@pytest.mark.parametrize("executor, attention", [("subprocess", "faulty_hang_blocked"), ("pool", "faulty_hang_blocked"),
                                                 ("subprocess", "spawn_and_hang")])
def test_a_killed_driver_leaves_no_process_and_closes_its_output(tmp_path, executor, attention, killed_driver_env):
    config = _config(tmp_path, executor, attention)
    proc, started, sessions = _start_and_wait_for_the_cell(config, tmp_path / "cab.sqlite", killed_driver_env)
    try:
        # at least the forkserver, the resource tracker and the cell (and the process the cell started)
        assert len(started) >= 3 + (attention == "spawn_and_hang"), [_cmdline(p) for p in started]
        stdout_closed, stderr_closed = _reader(proc.stdout), _reader(proc.stderr)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 5
        while (_alive(started) or _in_sessions(sessions)) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = _alive(started) | _in_sessions(sessions)
        assert not left, f"left running after the driver was killed: {[_cmdline(p) for p in left]}"
        assert stdout_closed.wait(5), "a process still holds the killed driver's stdout"
        assert stderr_closed.wait(5), "a process still holds the killed driver's stderr"
    finally:
        _cleanup(started | _in_sessions(sessions))


@pytest.mark.parametrize("executor", ["subprocess", "pool"])
def test_sigterm_is_handled_like_ctrl_c(tmp_path, executor):
    config, db = _config(tmp_path, executor), tmp_path / "cab.sqlite"
    proc, started, sessions = _start_and_wait_for_the_cell(config, db)
    try:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 143, stderr.decode()
        stderr = stderr.decode()
        assert "interrupted after 0 of 1 cells" in stderr and f"resume with: cab run {config}" in stderr
        with sqlite3.connect(db) as conn:
            assert conn.execute("SELECT state FROM runs").fetchall() == [("interrupted",)]
        deadline = time.monotonic() + 5
        while (_alive(started) or _in_sessions(sessions)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not (_alive(started) | _in_sessions(sessions))
    finally:
        _cleanup(started | _in_sessions(sessions))


def _cmdline(pid: int) -> str:
    try:
        return f"{pid}: " + Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
    except OSError:
        return f"{pid}: gone"
