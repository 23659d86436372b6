"""Versioned results: an attention's or a task's version enters its cells' keys and the gate's cache; a
stored result of another version is reported stale, run again and replaced; the report shows versions."""

import dataclasses
import importlib
import sqlite3
import textwrap

import pytest

from cab import registry
from cab.cells import Cell, Result
from cab.report.support import registry_declarations, support_matrix
from cab.run import run_grid
from cab.status import Status
from cab.store import SCHEMA_VERSION, ResultStore
from cab.tables import Tables


@pytest.fixture
def bump(monkeypatch):
    """Give a registered attention another version for the test."""
    def set_version(name: str, version: int) -> None:
        spec = registry.get_spec(name)
        monkeypatch.setitem(registry._ATTENTIONS._items, name, dataclasses.replace(spec, version=version))
    return set_version


def _cell(version: int, **fields) -> Cell:
    shape = {"lq": 8, "lk": 8, **fields}
    return Cell(kind="bench", attention="vanilla", pattern="NS", versions={"attention": version}, **shape)


def test_versions_enter_the_key_but_not_the_slot():
    assert _cell(1).key != _cell(2).key and _cell(1).slot == _cell(2).slot
    assert _cell(1).key == _cell(1).key and _cell(1, lq=9).slot != _cell(1).slot
    unversioned = Cell(kind="bench", attention="vanilla", pattern="NS", lq=8, lk=8)
    assert unversioned.slot == unversioned.key == _cell(1).slot  # results from before versions: one slot


def test_a_result_of_another_version_is_stale_and_replaced(tmp_path):
    with ResultStore(tmp_path / "cab.sqlite") as store:
        store.put(Result(cell=_cell(1), status=Status.OK, metrics={"x": 1.0}))
        store.put(Result(cell=_cell(1, lq=16, lk=16), status=Status.OK))
        assert store.stale_keys([_cell(2), _cell(1)]) == {_cell(2).key}
        store.put(Result(cell=_cell(2), status=Status.OK, metrics={"x": 2.0}))
        assert store.count() == 2 and store.get(_cell(1).key) is None
        assert store.get(_cell(2).key).metrics == {"x": 2.0} and store.stale_keys([_cell(2)]) == set()


def test_a_schema_2_store_gets_slots_and_its_unversioned_results_turn_stale(tmp_path):
    path = tmp_path / "cab.sqlite"
    old = Cell(kind="bench", attention="vanilla", pattern="NS", lq=8, lk=8)
    with ResultStore(path) as store:
        store.put(Result(cell=old, status=Status.OK))
    with sqlite3.connect(path) as conn:  # what a schema-2 cab wrote: no slot column
        conn.execute("DROP INDEX results_by_slot")
        conn.execute("ALTER TABLE results DROP COLUMN slot")
        conn.execute("PRAGMA user_version = 2")
    with ResultStore(path) as store:
        assert store.migrated_from == 2 and SCHEMA_VERSION == 3
        assert store.stale_keys([_cell(1)]) == {_cell(1).key}
        store.put(Result(cell=_cell(1), status=Status.OK))
        assert store.count() == 1 and store.get(old.key) is None


def _grid(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(textwrap.dedent("""\
        name: versions
        attentions: [vanilla, sdpa]
        patterns: [NS]
        threads: 1
        check: {}
        bench: {lengths: [8], heads: 2, head_dim: 8, modes: [fwd], min_run_time_s: 0.01, memory: false}
        """))
    return path


def test_a_new_version_reruns_only_its_own_cells(tmp_path, bump):
    config, db = _grid(tmp_path), tmp_path / "cab.sqlite"
    first = run_grid(config, db=db, render=False, progress=False)
    assert first.run == 4 and first.stale == 0
    bump("sdpa", 2)
    second = run_grid(config, db=db, render=False, progress=False)
    assert (second.skipped, second.run, second.stale) == (2, 2, 2)
    assert "2 of them stale" in str(second)
    with ResultStore(db) as store:
        versions = sorted((r.cell.attention, r.cell.versions["attention"]) for r in store.results())
        assert versions == [("sdpa", 2), ("sdpa", 2), ("vanilla", 1), ("vanilla", 1)]
        rows = {row.attention: row for row in support_matrix(Tables.from_frames(store.dataframe()),
                                                             registry_declarations(["sdpa", "vanilla"]))}
    assert rows["sdpa"].version == "v2" and rows["vanilla"].version == "v1"
    bump("vanilla", 3)
    with ResultStore(db) as store:
        row = support_matrix(Tables.from_frames(store.dataframe()), registry_declarations(["vanilla"]))[-1]
    assert row.attention == "vanilla" and row.version == "v1, registered v3"
    assert run_grid(config, db=db, render=False, progress=False).stale == 2


def test_the_gate_checks_a_new_version_again(monkeypatch, bump):
    gate_module = importlib.import_module("cab.check.gate")  # the package's `gate` is the function
    calls = []
    report = gate_module.gate("vanilla", "NS", {}, "cpu", "float32")
    monkeypatch.setattr(gate_module, "run_conformance", lambda *a, **k: calls.append(a) or report)
    gate_module.gate("vanilla", "NS", {}, "cpu", "float32")
    assert calls == []  # cached
    bump("vanilla", 2)
    gate_module.gate("vanilla", "NS", {}, "cpu", "float32")
    assert len(calls) == 1


def test_an_attention_named_by_a_hyperparameter_versions_its_users(bump):
    assert registry.versions_of("delta") == {"attention": 1, "hparam:base": 1}  # base = "local" by default
    bump("local", 4)
    assert registry.versions_of("delta")["hparam:base"] == 4
    assert registry.versions_of("delta", {"base": "vanilla"})["hparam:base"] == 1
    assert registry.versions_of("vanilla") == {"attention": 1}
