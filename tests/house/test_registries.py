"""One generic registry behind attentions, tasks, config sections, executors and cell kinds: duplicates are
refused, unknown names suggest near matches, built-ins load on first lookup; `cab list` filters."""

import json

import pytest

from cab import registry
from cab.cells import Cell, Outcome
from cab.cli import main
from cab.config import SECTIONS
from cab.executors import EXECUTORS, executor_class
from cab.grid import EXPANDERS
from cab.kinds import CELL_KINDS, describe, register_cell_kind, run_kind
from cab.registries import DuplicateName, Registry, UnknownName
from cab.runner import run_cell
from cab.status import Status
from cab.tasks import UnknownTask, get_task, task_names


def test_registry_adds_looks_up_refuses_duplicates_and_suggests():
    loads = []
    reg: Registry[int] = Registry("widget", loader=lambda: loads.append(1) or reg.add("gadget", 2, "module b"))
    reg.add("gizmo", 1, "module a")
    assert reg.get("gizmo") == 1 and loads == []  # a registered name needs no loading
    assert reg.names() == ["gadget", "gizmo"] and loads == [1]
    reg.names()
    assert loads == [1]  # loaded once
    assert reg.add("gizmo", 1) == 1  # the same thing again is a no-op
    with pytest.raises(DuplicateName, match="widget 'gizmo' is registered twice: by module a and by module c"):
        reg.add("gizmo", 3, "module c")
    with pytest.raises(UnknownName, match=r"unknown widget 'gizmos'; did you mean 'gizmo'\? \(known: gadget, gizmo\)"):
        reg.get("gizmos")
    copy = reg.copy()
    copy.add("extra", 4)
    assert "extra" in copy and "extra" not in reg
    reg.remove("gizmo")
    assert reg.names() == ["gadget"] and reg.peek("gizmo") is None


def test_every_kind_of_thing_lives_in_one_registry_class():
    for reg in (registry._ATTENTIONS, SECTIONS, EXPANDERS, EXECUTORS, CELL_KINDS):
        assert isinstance(reg, Registry)
    assert [name for name, _ in SECTIONS.ordered()][:3] == ["check", "bench", "tasks"]
    assert set(CELL_KINDS.names()) == {"check", "bench", "task"}
    assert [n for n, kind in CELL_KINDS.items() if kind.runs_alone] == ["bench"]  # timings run alone
    assert executor_class("local").__name__ == "LocalExecutor"
    with pytest.raises(
        UnknownName, match="unknown executor 'pol'; did you mean 'pool'.*executors: local, pool, ray, subprocess"
    ):
        executor_class("pol")
    with pytest.raises(registry.UnknownAttention, match="did you mean 'vanilla'"):
        registry.get_spec("vanila")
    assert "recall" in task_names()
    with pytest.raises(UnknownTask, match="unknown task 'recal'; did you mean 'recall'"):
        get_task("recal")


def test_a_registered_cell_kind_runs_through_the_runner(monkeypatch):
    monkeypatch.setattr("cab.kinds.CELL_KINDS", CELL_KINDS.copy())

    @register_cell_kind("echo", describe=lambda cell: f"echo {cell.attention}")
    def echo(cell: Cell) -> Outcome:
        return Outcome(Status.OK, metrics={"lq": cell.lq})

    cell = Cell(kind="echo", attention="vanilla", pattern="NS", lq=7)
    assert run_kind(cell).metrics == {"lq": 7} and describe(cell) == "echo vanilla"
    assert run_cell(cell).metrics == {"lq": 7}
    unknown = run_cell(Cell(kind="ehco", attention="vanilla", pattern="NS"))
    assert unknown.status is Status.ERROR and "unknown cell kind 'ehco'; did you mean 'echo'" in unknown.message


def test_list_filters_by_family_pattern_and_name(capsys):
    assert main(["list", "--family", "linear", "--pattern", "CC", "--json"]) == 0
    specs = json.loads(capsys.readouterr().out)
    assert specs and all(s["family"] == "linear" and "CC" in s["patterns"] for s in specs)
    assert len(specs) < len(registry.names())
    assert main(["list", "--name", "*flash*"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["name", "version"] and [r.split()[0] for r in lines[1:]] == ["flash"]
    assert main(["list", "--family", "lineer"]) == 2
    assert "did you mean 'linear'" in capsys.readouterr().err
    assert main(["list", "--name", "no-such-*"]) == 1
