"""`cab gpu-check` (cab.gpucheck, scripts/gpu-check.sh) without a GPU: the GPU plan's size and estimated time
fit its 8-minute budget; the CPU rehearsal runs the same script end to end into at most 8 files of at most
16 MiB with a readable store and a summary of the environment and every phase, with pydantic, datasets and
ray unimportable (a GPU image lacks them); a budget too small for the
plan records skipped cells with the reason instead of overrunning; a cell that swallows its first time-out
is still stopped."""

import json
import os
import subprocess
import sys
import time

import pytest

from cab import registry
from cab.failures import CellTimeout, time_limit
from cab.gpucheck import (
    MAX_FILE_BYTES,
    MAX_FILES,
    PlanError,
    estimate_plan,
    gate_cells,
    load_plan,
    parse_plan,
)
from cab.status import Status
from cab.store import ResultStore
from tests.paths import ROOT

GPU_PLAN = ROOT / "configs" / "gpu-check.yaml"
CPU_PLAN = ROOT / "configs" / "gpu-check-cpu.yaml"
SCRIPT = ROOT / "scripts" / "gpu-check.sh"
CABS_NINE = {"local", "cosformer", "longshort", "lara", "performer", "nystromformer", "probsparse", "abc", "s4d"}


# imported first by the child (sitecustomize): the packages a GPU image lacks fail to import
WITHOUT_PACKAGES = """
import importlib.abc, importlib.machinery, sys

class _Refuse(importlib.abc.Loader):
    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise ImportError(f"{module.__name__} is not installed on this (simulated) GPU image")

class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("pydantic", "datasets", "ray"):
            return importlib.machinery.ModuleSpec(name, _Refuse())
        return None

sys.meta_path.insert(0, _Finder())
"""


def _script(out, *args, budget_env=True, timeout=150, pythonpath=None):
    env = {**os.environ, "PYTHON": sys.executable}
    if pythonpath:
        env["PYTHONPATH"] = str(pythonpath)
    if budget_env:
        env["CAB_GPU_CHECK_T0"] = f"{time.time():.3f}"  # the budget counts the interpreter's start-up too
    return subprocess.run(["bash", str(SCRIPT), str(out), *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=timeout)


@pytest.fixture
def builtins_only(monkeypatch):
    """The registry as a fresh process has it: the test plugins other tests loaded into this one left out."""
    clean = registry._ATTENTIONS.copy()
    for name, spec in clean.items():
        if not spec.cls.__module__.startswith("cab."):
            clean.remove(name)
    monkeypatch.setattr(registry, "_ATTENTIONS", clean)


def test_gpu_plan_fits_the_eight_minute_budget(builtins_only):
    plan = load_plan(GPU_PLAN)
    est = estimate_plan(plan)
    assert plan.device == "cuda" and plan.budget_s == 480
    assert est.total_s <= plan.budget_s, est
    for phase in ("gate", "kernels", "panel"):  # every planned cell fits its phase: none is planned to be skipped
        assert est.uncapped_s[phase] <= getattr(plan, phase).budget_s, (phase, est.uncapped_s)
    caps = plan.gate.budget_s + plan.kernels.budget_s + plan.panel.budget_s
    assert plan.environment_est_s + caps + plan.reserve_s <= plan.budget_s
    registry.discover([])
    declared = sum(len(registry.get_spec(name).patterns) for name in registry.names())
    assert est.cells["gate"] == declared * 2 == len(gate_cells(plan))
    assert {c.dtype for c in gate_cells(plan)} == {"bfloat16", "float32"}
    rows = {row.name for row in plan.panel.rows}
    assert {"vanilla", "sdpa", "flex", "flash", "fla_chunk_linear"} | CABS_NINE <= rows
    triton_rows = {row.name for row in plan.panel.rows if row.hparams.get("backend") == "triton"}
    assert triton_rows == {"linear_elu", "sliding_window", "lightning"}
    assert (min(plan.panel.lengths), max(plan.panel.lengths)) == (1024, 32768)
    assert set(plan.panel.modes) == {"fwd", "fwdbwd"} and plan.panel.dtype == "bfloat16" and plan.panel.memory
    assert {row.name for row in plan.kernels.rows} == triton_rows
    print(f"GPU plan: {est.total_cells} cells, estimated {est.total_s:.0f} s of {plan.budget_s:.0f} s")


def test_plan_keys_are_checked():
    with pytest.raises(PlanError, match="gate.bogus"):
        parse_plan({**_raw(CPU_PLAN), "gate": {**_raw(CPU_PLAN)["gate"], "bogus": 1}})


def _raw(path):
    import yaml

    return yaml.safe_load(path.read_text())


@pytest.mark.slow
def test_cpu_rehearsal_end_to_end(tmp_path):
    out, site = tmp_path / "out", tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(WITHOUT_PACKAGES)
    start = time.time()
    proc = _script(out, "--device", "cpu", pythonpath=site)
    wall = time.time() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert wall < 90, wall
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= MAX_FILES and all(p.stat().st_size <= MAX_FILE_BYTES for p in files), files
    names = {p.name for p in files}
    assert {"cab.sqlite", "summary.md", "leaderboard.html", "gpu-check.log", "environment.json"} <= names
    summary = (out / "summary.md").read_text()
    assert "## Environment" in summary and "| torch |" in summary and "flash_attn: absent" in summary
    for phase in ("environment", "gate", "kernels", "panel", "report"):
        assert f"| {phase} | complete |" in summary, phase
    assert "**within the limits**" in summary
    assert "[gate 1/" in proc.stdout and "[panel]" in proc.stdout  # progress as it goes
    plan = load_plan(CPU_PLAN)
    with ResultStore(out / "cab.sqlite") as store:
        results = store.results()
        runs = store.runs_dataframe()
    kinds = {r.cell.kind for r in results}
    assert kinds == {"check", "kernel", "bench"}
    assert all(r.status is Status.OK for r in results), [(r.cell.attention, r.message) for r in results
                                                         if r.status is not Status.OK]
    assert len([r for r in results if r.cell.kind == "check"]) == len(gate_cells(plan))
    provenance = json.loads(runs["provenance"].iloc[0])
    assert provenance["packages"]["flash_attn"] is None and provenance["torch"] and "driver" in provenance
    print(f"CPU rehearsal: {len(results)} cells in {wall:.1f} s")


@pytest.mark.slow
def test_small_budget_skips_with_the_reason_and_does_not_overrun(tmp_path):
    out, budget = tmp_path / "out", 9.0
    start = time.time()
    proc = _script(out, "--device", "cpu", "--budget", str(budget), "--no-report")
    wall = time.time() - start
    assert wall < budget + 4, (wall, proc.stdout[-2000:])
    with ResultStore(out / "cab.sqlite") as store:
        results = store.results()
    skipped = [r for r in results if r.status is Status.SKIPPED]
    assert skipped and all("time budget" in r.message for r in skipped)
    assert {r.cell.kind for r in skipped} >= {"bench"}
    summary = (out / "summary.md").read_text()
    assert "cut by budget" in summary
    assert len([p for p in out.iterdir() if p.is_file()]) <= MAX_FILES


def test_a_repeated_time_limit_stops_a_cell_that_swallows_its_first_timeout():
    start, caught = time.time(), 0
    with pytest.raises(CellTimeout):
        with time_limit(0.2, repeat_s=1.0):
            while time.time() - start < 10:
                try:
                    time.sleep(0.05)
                except CellTimeout:
                    if caught:
                        raise
                    caught += 1  # a handler that swallows the first, as the Triton interpreter does
    assert caught == 1 and time.time() - start < 3
