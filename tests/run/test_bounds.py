"""`threads` and `executor.workers` far beyond the core count (issue 21): bounded with a message, never
thousands of threads or worker processes on a small machine."""

import textwrap

from cab.config import load_config
from cab.grid import expand
from cab.run import _executor, run_grid, usable_cores
from cab.store import ResultStore


def _config(tmp_path, threads: int, workers: "int | None" = None, kind: str = "local"):
    path = tmp_path / "bounds.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: bounds
        attentions: [vanilla]
        patterns: [NS]
        threads: {threads}
        bench: {{lengths: [8], heads: 2, head_dim: 8, modes: [fwd], min_run_time_s: 0.01, memory: false}}
        executor: {{kind: {kind}, timeout_s: 120{f", workers: {workers}" if workers else ""}}}
        """))
    return path


def test_threads_beyond_the_cores_are_bounded_with_a_message(tmp_path, capsys):
    config = _config(tmp_path, threads=4096)
    summary = run_grid(config, db=tmp_path / "cab.sqlite", render=False, progress=False)
    assert summary.counts == {"ok": 1}
    assert f"threads: 4096 is more than the {usable_cores()} cores" in capsys.readouterr().err
    with ResultStore(tmp_path / "cab.sqlite") as store:
        (result,) = store.results()
    assert result.cell.options["threads"] == usable_cores()


def test_pool_workers_beyond_the_cores_are_bounded_with_a_message(tmp_path, capsys):
    config = load_config(_config(tmp_path, threads=1, workers=10_000, kind="pool"))
    pool = _executor(config, None, None, None)
    assert pool.workers == usable_cores()
    assert f"10000 pool workers is more than the {usable_cores()} usable cores allow" in capsys.readouterr().err
    assert _executor(config, None, None, 1).workers == 1  # within bounds: as asked, silently
    assert capsys.readouterr().err == ""
    # cells of every core's threads: one worker at a time (what the config documents: cores / threads)
    assert _executor(load_config(_config(tmp_path, threads=usable_cores(), kind="pool")), None, None, None).workers == 1


def test_a_pool_runs_one_conformance_cell_per_core_beside_benchmarks_that_take_every_core(tmp_path):
    path = _config(tmp_path, threads=usable_cores(), kind="pool")
    path.write_text(path.read_text() + "check: {}\n")
    config = load_config(path)
    cells = expand(config)
    assert {c.kind for c in cells} == {"check", "bench"}
    assert _executor(config, None, None, None, cells).workers == usable_cores()  # checks: one thread each
    benches_only = [c for c in cells if c.kind == "bench"]
    assert _executor(config, None, None, None, benches_only).workers == 1
