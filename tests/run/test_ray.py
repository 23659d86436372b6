"""The Ray executor, for real, against one local Ray instance shared by the module (2 CPUs, loopback only):
same keys and statuses as the local executor, the fault-injection matrix's Ray column, a Ray worker
SIGKILLed mid-cell (the task is retried and the grid completes), nothing listening beyond loopback."""

import os
import signal
import textwrap
import threading
import time
from pathlib import Path

import pytest
import ray  # CI installs it (the ray extra of scripts/setup.sh): a plain import, never a skip

from cab.cells import Cell
from cab.executors import procfs
from cab.executors.ray import RayExecutor
from cab.run import run_grid
from cab.status import Status
from cab.store import ResultStore
from tests.run.test_faults import (
    FAULTY,
    MATRIX,
    MEMORY_LIMIT,
    OUTPUT_LIMIT,
    TIMEOUT_S,
    assert_matrix_column,
    fault_cell,
)

PROBE_PLUGIN = '''\
import os
import time

import cab
from cab.attention.engine.scores import masked_softmax_attention

_ANNOUNCED = False


@cab.register_attention("ray_probe", patterns=("NS",), family="test", exact=True)
class RayProbe(cab.Attention):
    """Exact attention that, on its first call in a process, appends its pid to `marker` and sleeps."""

    def __init__(self, pattern, num_heads, head_dim, marker: str = "", nap: float = 0.0):
        super().__init__(pattern, num_heads, head_dim)
        self.marker, self.nap = marker, nap

    def forward(self, q, k, v, key_padding_mask=None):
        global _ANNOUNCED
        if self.marker and not _ANNOUNCED:
            _ANNOUNCED = True
            with open(self.marker, "a") as f:
                f.write(f"{os.getpid()}\\n")
            time.sleep(self.nap)
        return masked_softmax_attention(self, q, k, v, key_padding_mask)
'''


@pytest.fixture(scope="module")
def ray_instance():
    executor = RayExecutor(num_cpus=2)
    executor._connect()  # starts the instance the other executors of this module join
    yield
    executor.close()


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    path = tmp_path_factory.mktemp("ray-plugins") / "probe.py"
    path.write_text(PROBE_PLUGIN)
    return str(path)


def _listening_inodes() -> "dict[int, str]":
    """inode -> local address of every listening TCP socket on this machine."""
    found = {}
    loopback6 = {"00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}  # ::1, ::ffff:127.0.0.1
    for table, loopback in (("/proc/net/tcp", {"0100007F"}), ("/proc/net/tcp6", loopback6)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A":  # LISTEN
                address = fields[1].split(":")[0]
                found[int(fields[9])] = "loopback" if address in loopback else address
    return found


def test_nothing_listens_beyond_loopback(ray_instance):
    listening = _listening_inodes()
    ours = {}
    for pid in procfs.tree(os.getpid()):
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue
        for link in links:
            if link.startswith("socket:[") and int(link[8:-1]) in listening:
                ours[int(link[8:-1])] = listening[int(link[8:-1])]
    assert ours, "the Ray instance should be listening somewhere (on loopback)"
    assert set(ours.values()) == {"loopback"}, ours


def test_same_keys_and_statuses_as_the_local_executor(ray_instance, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(textwrap.dedent("""\
        name: tiny
        attentions: [vanilla, flash]
        patterns: [NS, CC]
        threads: 1
        check: {patterns: [CC]}
        bench: {patterns: [NS], lengths: [16], heads: 2, head_dim: 8, modes: [fwd], min_run_time_s: 0.01,
                min_samples: 3, memory: false}
        """))
    local = run_grid(config, db=tmp_path / "local.sqlite", executor="local", render=False, progress=False)
    remote = run_grid(config, db=tmp_path / "ray.sqlite", executor="ray", render=False, progress=False)
    assert (local.planned, remote.planned, remote.run) == (4, 4, 4)

    def rows(db):
        with ResultStore(db) as store:
            return {r.key: r.status for r in store.results()}, store.runs_dataframe()["executor"].tolist()

    (local_rows, local_runs), (ray_rows, ray_runs) = rows(tmp_path / "local.sqlite"), rows(tmp_path / "ray.sqlite")
    assert ray_rows == local_rows
    assert sorted(s.value for s in ray_rows.values()) == ["ok", "ok", "unsupported", "unsupported"]
    assert (local_runs, ray_runs) == (["local"], ["ray"])


def test_fault_matrix_ray(ray_instance):
    cells = [fault_cell(b) for b in MATRIX if "subprocess" in MATRIX[b]]
    executor = RayExecutor(timeout_s=TIMEOUT_S, grace_s=1, plugins=[FAULTY], memory_limit_bytes=MEMORY_LIMIT,
                           max_output_bytes=OUTPUT_LIMIT)
    results = {r.cell.attention.removeprefix("faulty_"): r for r in executor.run(cells)}
    assert set(results) == {c.attention.removeprefix("faulty_") for c in cells}
    assert_matrix_column("subprocess", results)  # the same statuses and reasons as the subprocess executor
    executor.close()
    assert ray.is_initialized()  # it joined the module's instance, so it leaves it running


def _ray_worker_of(cell_pid: int) -> int:
    """The Ray worker above a cell process: cell -> forkserver -> Ray worker."""
    def parent(pid):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2:].split()[1])
    return parent(parent(cell_pid))


def test_a_ray_worker_killed_mid_cell_is_retried_and_the_grid_completes(ray_instance, probe, tmp_path):
    marker = tmp_path / "pids.txt"
    cells = [Cell(kind="check", attention="ray_probe", pattern="NS", hparams={"marker": str(marker), "nap": 1.5},
                  options={"threads": 1})]
    cells += [Cell(kind="check", attention="ray_probe", pattern="NS", seed=s, options={"threads": 1}) for s in (1, 2)]
    killed = []

    def kill_the_first_worker():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (marker.exists() and marker.read_text().strip()):
            time.sleep(0.05)
        worker = _ray_worker_of(int(marker.read_text().split()[0]))
        os.kill(worker, signal.SIGKILL)
        killed.append(worker)

    killer = threading.Thread(target=kill_the_first_worker, daemon=True)
    killer.start()
    executor = RayExecutor(timeout_s=60, plugins=[probe], max_retries=2)
    results = list(executor.run(cells))
    killer.join(10)
    assert len(killed) == 1
    assert sorted(r.key for r in results) == sorted(c.key for c in cells)  # each once, none lost
    assert all(r.status is Status.OK for r in results), [r.message[-500:] for r in results]
    assert len(marker.read_text().split()) == 2  # the killed cell ran again, on another worker
