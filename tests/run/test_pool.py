"""The pool executor: the subprocess executor's fault statuses (column "subprocess" of test_faults' matrix)
with a worker replaced after each fatal fault; workers reused between cells; cells in parallel but
benchmark cells alone; `cab run --workers`."""

import importlib
import os
import signal
import textwrap

import pytest

from cab.cells import Cell
from cab.executors import get_executor
from cab.executors import pool as pool_module
from cab.executors.pool import PoolExecutor, default_workers, lane
from cab.run import _command, run_grid
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

# Loaded only inside worker processes. Each forward logs "tag pid start end met" after a nap, so the test can
# see which process ran a cell and which cells overlapped in time; with a `partner`, it first waits (up to 60 s)
# for the partner's forward to have started, so "ran together" is shown by a rendezvous, not by two naps
# happening to overlap on a busy machine.
PROBE_PLUGIN = '''\
import os
import time

import cab
from cab.attention.engine.scores import masked_softmax_attention


@cab.register_attention("pool_probe", patterns=("NS",), family="test", exact=True)
class Probe(cab.Attention):
    """Exact attention whose forward naps `nap` seconds once per cell and logs its interval to `log`."""

    def __init__(self, pattern, num_heads, head_dim, log: str = "", nap: float = 0.0, tag: str = "",
                 partner: str = ""):
        super().__init__(pattern, num_heads, head_dim)
        self.log, self.nap, self.tag, self.partner, self.logged = log, nap, tag, partner, False

    def forward(self, q, k, v, key_padding_mask=None):
        if self.log and not self.logged:
            start = time.time()
            open(f"{self.log}.{self.tag}", "w").close()
            met = 0
            while self.partner and time.time() - start < 60:
                if os.path.exists(f"{self.log}.{self.partner}"):
                    met = 1
                    break
                time.sleep(0.01)
            time.sleep(self.nap)
            with open(self.log, "a") as f:
                f.write(f"{self.tag} {os.getpid()} {start} {time.time()} {met}\\n")
            self.logged = True
        return masked_softmax_attention(self, q, k, v, key_padding_mask)
'''


@pytest.fixture(scope="module")
def probe(write_plugin):
    return write_plugin("pool-plugins", "probe.py", PROBE_PLUGIN)


def _check(log, tag: str, nap: float, partner: str = "") -> Cell:
    """A conformance cell: it may share the machine (it builds and runs the attention several times)."""
    hparams = {"log": log, "nap": nap, "tag": tag, **({"partner": partner} if partner else {})}
    return Cell(kind="check", attention="pool_probe", pattern="NS", hparams=hparams, options={"threads": 1})


def _bench(log, tag: str, nap: float) -> Cell:
    return Cell(kind="bench", attention="pool_probe", pattern="NS", hparams={"log": log, "nap": nap, "tag": tag},
                heads=2, kv_heads=2, lq=16, lk=16, head_dim=8, mode="fwd",
                options={"threads": 1, "gate": False, "memory": False, "min_run_time_s": 0.01})


def _intervals(log) -> "dict[str, tuple[int, float, float]]":
    """tag -> (pid, first start, last end) over the log's lines."""
    spans: dict = {}
    for tag, pid, start, end, _ in (line.split() for line in open(log).read().splitlines()):
        _, s, e = spans.get(tag, (0, float(start), float(end)))
        spans[tag] = (int(pid), min(s, float(start)), max(e, float(end)))
    return spans


def _met(log, tag: str) -> bool:
    """Whether the first forward of `tag` found its partner's forward started (the rendezvous)."""
    lines = [line.split() for line in open(log).read().splitlines()]
    return next(line for line in lines if line[0] == tag)[4] == "1"


def test_fault_statuses_match_the_subprocess_executor_and_workers_are_replaced():
    cells = [fault_cell(b) for b in MATRIX if "subprocess" in MATRIX[b]]
    cells.append(Cell(kind="check", attention="vanilla", pattern="NS", options={"threads": 1}))
    executor = PoolExecutor(timeout_s=TIMEOUT_S, grace_s=1, plugins=[FAULTY], workers=2,
                            memory_limit_bytes=MEMORY_LIMIT, max_output_bytes=OUTPUT_LIMIT)
    with executor:
        results = {r.cell.attention.removeprefix("faulty_"): r for r in executor.run(cells)}
    assert sorted(results) == sorted([c.attention.removeprefix("faulty_") for c in cells])
    vanilla = results.pop("vanilla")
    assert vanilla.status is Status.OK, vanilla.message  # the pool goes on after every fault
    assert_matrix_column("subprocess", results)
    assert "faulty.py" in results["segfault"].message  # faulthandler's traceback, from the worker's stderr
    assert MEMORY_LIMIT < results["memory"].metrics["rss_bytes"] < MEMORY_LIMIT + 1024 * 2**20
    assert "about" not in results["raise"].message  # each cell's message carries its own output only


def test_workers_are_reused_cells_run_in_parallel_and_benchmarks_alone(probe, tmp_path):
    log = str(tmp_path / "intervals.txt")
    parallel = [_check(log, "p0", 0.2, partner="p1"), _check(log, "p1", 0.2, partner="p0")]
    parallel += [_check(log, f"p{i}", 0.2) for i in (2, 3)]
    cells = parallel[:2] + [_bench(log, "alone", 0.5)] + parallel[2:]
    executor, processes = PoolExecutor(timeout_s=60, plugins=[probe], workers=2), set()
    with executor:
        results = list(executor.run(cells, on_start=lambda _: processes.update(w.process for w in executor._pool)))
    assert [r.status for r in results] == [Status.OK] * 5, [r.message for r in results]
    assert [p.exitcode for p in processes] == [0, 0]  # idle workers exit by themselves at the end (not killed)
    spans = _intervals(log)
    assert set(spans) == {"p0", "p1", "p2", "p3", "alone"}
    pids = {pid for pid, _, _ in spans.values()}
    assert len(pids) == 2 and os.getpid() not in pids  # two warm workers served five cells
    _, start, end = spans.pop("alone")
    for tag, (_, s, e) in spans.items():
        assert e <= start or s >= end, f"{tag} overlapped the benchmark cell"
    assert _met(log, "p0") and _met(log, "p1")  # p0 and p1 ran together: each found the other started


def test_cells_of_a_lane_run_one_at_a_time_on_one_worker_while_other_cells_go_ahead(probe, tmp_path, monkeypatch):
    """Cells of one lane never overlap and run on the same worker; the cell queued after the lane's first
    two runs on the other worker meanwhile. (The lane is given here; which cells get one is tested below.)"""
    monkeypatch.setattr(pool_module, "lane", lambda cell: "compile:probe" if cell.hparams["tag"][0] == "c" else None)
    log = str(tmp_path / "intervals.txt")
    cells = [_check(log, "c0", 0.2, partner="p"), _check(log, "c1", 0.2), _check(log, "p", 0.2, partner="c0"),
             _check(log, "c2", 0.2)]
    with PoolExecutor(timeout_s=60, plugins=[probe], workers=2) as executor:
        results = list(executor.run(cells))
    assert [r.status for r in results] == [Status.OK] * 4, [r.message for r in results]
    spans = _intervals(log)
    assert _met(log, "c0") and _met(log, "p")  # p ran while the lane's first cell ran (a rendezvous)
    assert spans["c0"][2] < spans["c1"][1] and spans["c1"][2] < spans["c2"][1]  # one at a time, in order
    assert spans["c0"][0] == spans["c1"][0] == spans["c2"][0] != spans["p"][0]  # on one worker


def test_conformance_cells_of_attentions_that_compile_per_shape_share_a_lane():
    def check(attention, **hparams):
        return lane(Cell(kind="check", attention=attention, pattern="NS", hparams=hparams))

    assert check("flex") == "compile:flex"
    assert check("sliding_window", backend="flex") == "compile:sliding_window"
    assert check("sliding_window") is None and check("vanilla") is None
    assert check("no_such_attention") is None  # its cell reports the unknown name
    assert lane(Cell(kind="bench", attention="flex", pattern="NS")) is None  # benchmarks run alone anyway


def test_run_grid_with_a_pool_stores_what_local_stores(probe, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(textwrap.dedent(f"""\
        name: tiny
        plugins: [{probe}]
        attentions: [pool_probe, vanilla]
        threads: 1
        check: {{patterns: [NS, CS]}}
        """))
    local = run_grid(config, db=tmp_path / "local.sqlite", render=False, progress=False)
    pooled = run_grid(config, db=tmp_path / "pool.sqlite", executor="pool", workers=2, render=False,
                      progress=False)
    assert local.counts == pooled.counts == {"ok": 3, "unsupported": 1}

    def rows(db):
        with ResultStore(db) as store:
            return {r.key: r.status for r in store.results()}, store.runs_dataframe()["executor"].tolist()

    assert rows(tmp_path / "local.sqlite")[0] == rows(tmp_path / "pool.sqlite")[0]
    assert rows(tmp_path / "pool.sqlite")[1] == ["pool"]


def test_cells_without_threads_share_the_cores_and_benchmarks_get_them_all(probe, tmp_path):
    cores = default_workers()
    plain = [Cell(kind="check", attention="pool_probe", pattern="NS", seed=s) for s in (1, 2)]
    bench = _bench(str(tmp_path / "log.txt"), "alone", 0.0)
    bench = Cell(**{**bench.to_dict(), "options": {**bench.options, "threads": None}})
    own = Cell(kind="check", attention="pool_probe", pattern="NS", seed=3, options={"threads": 1})
    with PoolExecutor(timeout_s=60, plugins=[probe], workers=2) as executor:
        results = {r.key: r for r in executor.run(plain + [bench, own])}
    assert [results[c.key].provenance["threads"] for c in plain] == [max(1, cores // 2)] * 2
    assert results[bench.key].provenance["threads"] == cores
    assert results[own.key].provenance["threads"] == 1


def test_an_idle_worker_killed_between_cells_is_replaced(probe):
    executor = PoolExecutor(timeout_s=60, plugins=[probe], workers=1)
    cells = [Cell(kind="check", attention="pool_probe", pattern="NS", seed=s, options={"threads": 1})
             for s in (1, 2)]
    pids = []  # the worker each cell was given to
    with executor:
        results = executor.run(cells, on_start=lambda _: pids.append(executor._pool[0].process.pid))
        first = next(results)  # the only worker is idle now: kill it from outside
        os.kill(executor._pool[0].process.pid, signal.SIGKILL)
        executor._pool[0].process.join(10)
        second = next(results)
    assert (first.status, second.status) == (Status.OK, Status.OK), second.message
    assert pids[0] != pids[1]  # the second cell went to a fresh worker


def test_workers_option_and_command_line():
    assert get_executor("pool", workers=3).workers == 3
    assert get_executor("pool").workers == default_workers() >= 1
    with pytest.raises(ValueError, match="at least 1"):
        PoolExecutor(workers=0)
    assert _command("g.yaml", executor="pool", workers=4) == "cab run g.yaml --executor pool --workers 4"


def test_workers_share_correctness_verdicts_through_the_gate_folder(tmp_path, monkeypatch):
    """A verdict computed by one process is read by another of the same run instead of recomputed."""
    gate_module = importlib.import_module("cab.check.gate")  # the module (cab.check exports the function)

    monkeypatch.setenv(gate_module.GATE_DIR_ENV, str(tmp_path / "gates"))
    monkeypatch.setattr(gate_module, "_REPORTS", {})
    first = gate_module.gate("performer", "CS", {}, "cpu", "float32")
    assert first.status is Status.OK and len(list((tmp_path / "gates").glob("*.json"))) == 1

    def recompute(*args, **kwargs):
        raise AssertionError("the shared verdict should have been read")

    monkeypatch.setattr(gate_module, "_REPORTS", {})  # another process: empty in-process cache
    monkeypatch.setattr(gate_module, "run_conformance", recompute)
    again = gate_module.gate("performer", "CS", {}, "cpu", "float32")
    assert again.to_metrics() == first.to_metrics() and again.pattern == first.pattern
    monkeypatch.delenv(gate_module.GATE_DIR_ENV)
    with pytest.raises(AssertionError, match="should have been read"):  # no folder: nothing shared
        gate_module.gate("performer", "NS", {}, "cpu", "float32")
