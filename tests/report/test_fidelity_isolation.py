"""The report's fidelity pass runs plugin code isolated (issue 21, item 3): an attention that passed its
checks but segfaults or hangs in C (SIGALRM blocked) during the fidelity measurements leaves a written
leaderboard whose fidelity rows say what happened, and the driver exits 0."""

from __future__ import annotations

import csv
import subprocess
import sys
import time

from cab.status import Status
from tests.paths import PLUGINS, ROOT
from tests.report.test_report import check, write_store

FAULTY = str(PLUGINS / "faulty.py")


def _report(tmp_path, attentions, budget_s):
    ok = [{"name": "forward", "status": "ok", "error": 0.0, "tolerance": 1e-5}]
    db = write_store(tmp_path / "cab.sqlite", [check(name, "NS", Status.OK, ok) for name in attentions])
    out = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "cab.cli", "report", "--db", str(db), "--out", str(out),
                           "--plugin", FAULTY, "--fidelity-budget", str(budget_s)],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "index.html").is_file()
    return {r["attention"]: r for r in csv.DictReader((out / "tables" / "fidelity.csv").open(encoding="utf-8"))}


def test_a_segfault_in_the_fidelity_pass_is_a_row_note(tmp_path):
    rows = _report(tmp_path, ("faulty_segfault", "vanilla"), 60)
    assert rows["faulty_segfault"]["note"] == "could not run: killed by SIGSEGV"
    assert rows["vanilla"]["approx_rel_rmse_random"] and not rows["vanilla"]["note"]  # measured after the crash


def test_a_hang_in_c_in_the_fidelity_pass_is_killed_at_the_budget(tmp_path):
    started = time.monotonic()
    rows = _report(tmp_path, ("faulty_hang_blocked",), 3)
    assert "ran out during it" in rows["faulty_hang_blocked"]["note"]
    assert time.monotonic() - started < 200  # killed at the budget plus a short grace, not waited for


def test_the_pass_goes_on_after_a_crash(tmp_path):
    from cab import registry
    from cab.report.fidelity import fidelity

    registry.load_plugin(FAULTY)  # never run here: only the measuring processes run its forward
    measured = fidelity([("faulty_segfault", "NS"), ("vanilla", "NS"), ("faulty_raise", "NS")], budget_s=60,
                        dtypes=("float32",), plugins=[FAULTY])
    rows = {r.attention: r for r in measured.rows}
    assert rows["faulty_segfault"].note == "could not run: killed by SIGSEGV"
    assert rows["faulty_raise"].note.startswith("could not run: RuntimeError")
    assert rows["vanilla"].random is not None and not rows["vanilla"].note and "float32" in rows["vanilla"].deviation


def test_cab_run_takes_a_fidelity_budget():
    from cab.cli import build_parser

    args = build_parser().parse_args(["run", "configs/quick.yaml", "--fidelity-budget", "0"])
    assert args.fidelity_budget == 0


def test_render_leaderboard_passes_the_budget_on(monkeypatch, tmp_path):
    import cab.report
    from cab.run import render_leaderboard

    seen = {}
    monkeypatch.setattr(cab.report, "render_report", lambda db, out, **kw: seen.update(kw) or out / "index.html")
    render_leaderboard(tmp_path / "db", tmp_path, 0)
    assert seen == {"fidelity_budget_s": 0}
