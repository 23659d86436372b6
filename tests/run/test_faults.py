"""Fault injection: every deliberately faulty plugin (tests/plugins/faulty.py) becomes a status row with the
reason, through each executor, and the grid goes on. The Ray column of the matrix is in test_ray.py.

Matrix (behaviour x executor -> status); "-" = not run: the local executor shares the driver's process,
so a segfault or a memory blow-up there takes the driver down (that is what the isolating executors are
for), and a hang that blocks signals cannot be interrupted in-process.
"""

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cab import registry
from cab.cells import Cell
from cab.executors import procfs
from cab.executors.local import LocalExecutor
from cab.executors.subprocess import SubprocessExecutor
from cab.run import run_grid
from cab.status import Status
from cab.store import ResultStore
from tests.paths import PLUGINS

FAULTY = str(PLUGINS / "faulty.py")
MEMORY_LIMIT = 1024 * 2**20
OUTPUT_LIMIT = 8 * 2**20
# the cells' time limit: what the hangs wait for; long enough that a faulty cell sharing two cores with the
# others' full conformance runs still reaches its fault (the memory cell its allocation) before it
TIMEOUT_S = 5

# behaviour -> {executor: (status, fragment of the message)}
MATRIX = {
    "hang": {"local": (Status.TIMEOUT, f"time limit of {TIMEOUT_S} s"),
             "subprocess": (Status.TIMEOUT, f"time limit of {TIMEOUT_S} s")},
    "hang_blocked": {"subprocess": (Status.TIMEOUT, f"hard time limit of {TIMEOUT_S + 1} s")},
    "segfault": {"subprocess": (Status.ERROR, "signal SIGSEGV")},
    "raise": {"local": (Status.ERROR, "deliberate failure"), "subprocess": (Status.ERROR, "deliberate failure")},
    "exit": {"local": (Status.ERROR, "SystemExit: sys.exit(0)"),
             "subprocess": (Status.ERROR, "SystemExit: sys.exit(0)")},
    "nan": {"local": (Status.INCORRECT, "finite"), "subprocess": (Status.INCORRECT, "finite")},
    "wrong_shape": {"local": (Status.INCORRECT, "output shape"), "subprocess": (Status.INCORRECT, "output shape")},
    "memory": {"subprocess": (Status.OOM, "over the memory limit of 1,024 MiB")},
    "print": {"local": (Status.OK, "checks passed"), "subprocess": (Status.ERROR, "over the output limit of 8.0 MiB")},
}


def fault_cell(behaviour: str) -> Cell:
    return Cell(kind="check", attention=f"faulty_{behaviour}", pattern="NS", options={"threads": 1})


def assert_matrix_column(executor_name: str, results) -> None:
    for behaviour, result in results.items():
        status, fragment = MATRIX[behaviour][executor_name]
        assert result.status is status, f"{behaviour}: {result.status} {result.message[-1500:]}"
        assert fragment in result.message, f"{behaviour}: {result.message[-1500:]}"
        assert len(result.message) < 10_000  # output is never copied whole into the store


def test_fault_matrix_subprocess():
    cells = [fault_cell(b) for b in MATRIX if "subprocess" in MATRIX[b]]
    executor = SubprocessExecutor(timeout_s=TIMEOUT_S, grace_s=1, plugins=[FAULTY], memory_limit_bytes=MEMORY_LIMIT,
                                  max_output_bytes=OUTPUT_LIMIT)
    results = {c.attention.removeprefix("faulty_"): r for c, r in zip(cells, executor.run(cells))}
    assert_matrix_column("subprocess", results)
    assert "faulty.py" in results["segfault"].message  # faulthandler's traceback names the crashing file
    oom = results["memory"].metrics
    assert MEMORY_LIMIT < oom["rss_bytes"] < MEMORY_LIMIT + 1024 * 2**20  # killed soon after the limit
    assert results["print"].metrics["output_bytes"] > OUTPUT_LIMIT


def test_fault_matrix_local():
    registry.discover([FAULTY])
    warm = Cell(kind="check", attention="vanilla", pattern="NS", options={"threads": 1})
    (warmed,) = LocalExecutor(timeout_s=None).run([warm])  # first check in a process pays lazy imports
    assert warmed.status is Status.OK
    cells = [fault_cell(b) for b in MATRIX if "local" in MATRIX[b] and b != "print"]
    results = {c.attention.removeprefix("faulty_"): r
               for c, r in zip(cells, LocalExecutor(timeout_s=TIMEOUT_S, plugins=[FAULTY]).run(cells))}
    # the correct-but-loud attention runs the whole conformance suite: a limit that fits it on a busy machine
    (printed,) = LocalExecutor(timeout_s=120, plugins=[FAULTY]).run([fault_cell("print")])
    assert_matrix_column("local", {**results, "print": printed})


def test_the_grid_goes_on_past_every_fault(tmp_path):
    config = tmp_path / "faults.yaml"
    config.write_text(textwrap.dedent(f"""\
        name: faults
        plugins: [{FAULTY}]
        attentions: [faulty_segfault, faulty_memory, faulty_raise, vanilla]
        patterns: [NS]
        threads: 1
        check: {{}}
        executor: {{kind: subprocess, timeout_s: 10, grace_s: 1, memory_limit_bytes: 1 GiB}}
        """))
    summary = run_grid(config, db=tmp_path / "faults.sqlite", render=False, progress=False)
    assert (summary.planned, summary.run) == (4, 4)
    with ResultStore(tmp_path / "faults.sqlite") as store:
        statuses = {r.cell.attention: r.status for r in store.results()}
    assert statuses == {"faulty_segfault": Status.ERROR, "faulty_memory": Status.OOM, "faulty_raise": Status.ERROR,
                        "vanilla": Status.OK}


def test_process_tree_memory_matches_the_kernels_own_accounting():
    """procfs sums RSS over a process and its children; compare with VmRSS from /proc/PID/status."""
    hog = ("import time; b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096]); "
           "print('ok', flush=True); time.sleep(30)")
    parent = subprocess.Popen([sys.executable, "-c",
                               f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {hog!r}]); "
                               "time.sleep(30)"])
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            pids = procfs.tree(parent.pid)
            if len(pids) == 2 and procfs.rss_bytes(pids[1]) > 200 * 2**20:
                break
            time.sleep(0.05)
        assert len(pids) == 2, pids
        vmrss = 0
        for pid in pids:
            status = Path(f"/proc/{pid}/status").read_text()
            vmrss += int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) * 1024
        total = procfs.tree_rss_bytes(parent.pid)
        assert total > 200 * 2**20
        assert abs(total - vmrss) < 8 * 2**20  # sampled a moment apart
    finally:
        for pid in reversed(procfs.tree(parent.pid)):
            os.kill(pid, 9)
        parent.wait()


@pytest.mark.skipif(not procfs.available(), reason="needs Linux /proc")
def test_procfs_is_available_here():
    assert procfs.rss_bytes(os.getpid()) > 0 and procfs.tree(os.getpid())[0] == os.getpid()


def test_sys_exit_in_a_plugin_never_ends_cab_silently(tmp_path, capsys):
    from cab.cli import main

    assert main(["check", "faulty_exit", "--plugin", FAULTY, "--pattern", "NS"]) == 1
    out = capsys.readouterr().out
    assert "SystemExit" in out and "faulty_exit" in out
    exits_on_import = tmp_path / "exits_on_import.py"
    exits_on_import.write_text("import sys\nsys.exit(0)\n")
    assert main(["check", str(exits_on_import)]) != 0
    assert "SystemExit" in capsys.readouterr().err
    (bench,) = LocalExecutor(timeout_s=60, plugins=[FAULTY]).run([Cell(
        kind="bench", attention="faulty_exit", pattern="NS", lq=8, lk=8, heads=2, kv_heads=2, head_dim=8,
        mode="fwd", options={"threads": 1, "gate": False, "memory": False, "min_run_time_s": 0.01})])
    assert bench.status is Status.ERROR and "SystemExit" in bench.message
