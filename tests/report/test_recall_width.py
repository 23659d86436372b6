"""The report's "Recall versus width" figure (Zoology's MQAR figure): recall accuracy against model width,
one panel per (sequence length, pairs), one line per attention with 95% intervals; drawn from a store with
recall results at several widths, absent from one with a single width; its export holds hand-computed means
and interval half widths, and the cells that failed are named."""

from __future__ import annotations

import base64
import csv
import math

import pytest

from cab.cells import Cell, Result
from cab.report import render_report
from cab.report.leaderboard import accuracy
from cab.status import Status
from cab.store import ResultStore
from cab.tables import Tables
from tests.report.test_report import PROVENANCE, parse, write_store

T_975_2 = 4.302652729911275  # Student t quantile, 0.975, 2 degrees of freedom (tables)
# (length, pairs) -> attention -> width -> per-seed accuracy; linear_elu at L=256 only at width 128
ACCURACY = {
    (128, 8): {"sdpa": {64: [1.0, 0.98, 0.99], 128: [1.0, 1.0, 1.0]},
               "linear_elu": {64: [0.6, 0.7, 0.8], 128: [0.9, 0.85, 0.95]},
               "no_mixing": {64: [0.1, 0.1, 0.1], 128: [0.12, 0.1, 0.11]}},
    (256, 16): {"sdpa": {64: [0.99, 0.97, 0.98], 128: [1.0, 0.99, 1.0]},
                "linear_elu": {128: [0.4, 0.5, 0.6]},
                "only_here": {64: [0.3, 0.3, 0.3]}},
}


def recall(attention: str, length: int, pairs: int, width: int, seed: int, value: "float | None",
           status: Status = Status.OK, pattern: str = "CS") -> Result:
    params = {"length": length, "pairs": [pairs], "binding": "joint", "d_model": width, "lr": 0.01}
    cell = Cell(kind="task", attention=attention, pattern=pattern, seed=seed, mode="train", task="recall",
                task_params=params, lq=length, lk=length, heads=2, head_dim=width // 2)
    metrics = {} if value is None else {"accuracy": value, "chance": {"accuracy": 1 / pairs}}
    return Result(cell, status, metrics=metrics, provenance=PROVENANCE, started_at="2025-01-01T00:00:00+00:00",
                  finished_at="2025-01-01T00:01:00+00:00")


def sweep() -> "list[Result]":
    results = [recall(name, length, pairs, width, seed, value)
               for (length, pairs), per_name in ACCURACY.items() for name, per_width in per_name.items()
               for width, values in per_width.items() for seed, value in enumerate(values)]
    results.append(recall("linear_elu", 256, 16, 64, 0, None, Status.TIMEOUT))  # no ok result there
    results.append(recall("sdpa", 128, 8, 64, 0, 0.5, pattern="NS"))  # NS: one width only, no figure
    return results


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_store(tmp_path_factory.mktemp("width") / "cab.sqlite", sweep())


@pytest.fixture(scope="module")
def acc(store):
    with ResultStore(store) as s:
        return accuracy(Tables.from_frames(s.dataframe()), set())


def svg_of(plot) -> str:
    return base64.b64decode(plot.uri.split(",", 1)[1]).decode("utf-8")


def test_one_figure_per_pattern_with_several_widths(acc):
    assert [pattern for pattern, _, _, _ in acc.recall_width] == ["CS"]
    pattern, plot, frame_id, note = acc.recall_width[0]
    assert frame_id == "recall-width-CS" and "model width" in plot.alt
    svg = svg_of(plot)
    for text in ("L=128, 8 pairs", "L=256, 16 pairs", "model width d_model"):
        assert text in svg
    # one legend for both panels: an attention drawn only in the second panel is in it too
    assert "only_here" in svg and "linear_elu" in svg
    assert note.startswith("Not drawn") and "linear_elu at L=256, d_model=64" in note


def test_export_holds_means_and_interval_half_widths(acc):
    frame = dict((i, f) for i, _, f in acc.exports)["recall-width-CS"]
    rows = {(r["length"], r["attention"], r["d_model"]): r for r in frame.to_dict("records")}
    linear = rows[(128, "linear_elu", 64)]  # 0.6, 0.7, 0.8: mean 0.7, sd 0.1
    assert linear["accuracy_mean"] == pytest.approx(0.7) and linear["seeds"] == 3 and linear["pairs"] == "8"
    assert linear["ci95_half"] == pytest.approx(T_975_2 * 0.1 / math.sqrt(3))
    assert rows[(128, "no_mixing", 64)]["ci95_half"] == pytest.approx(0.0)
    failed = rows[(256, "linear_elu", 64)]
    assert failed["seeds"] == 0 and failed["failed"] == 1 and math.isnan(failed["accuracy_mean"])
    assert (256, "no_mixing", 64) not in rows  # never run there: no row
    assert len(rows) == 6 + 4 + 1  # L=128: 3 attentions x 2 widths; L=256: 4 drawn points and the failed one


def test_the_page_shows_the_figure_and_its_export(store, tmp_path):
    index = render_report(store, tmp_path / "site", fidelity_budget_s=0)
    html = index.read_text(encoding="utf-8")
    root = parse(html)
    heading = root.by_id("recall-width")
    assert heading is not None and heading.text == "Recall versus width"
    alts = [img.attrs.get("alt", "") for img in root.find_all("img")]
    assert any("recall accuracy against model width" in alt for alt in alts)
    with open(tmp_path / "site" / "tables" / "recall-width-CS.csv", newline="", encoding="utf-8") as f:
        exported = list(csv.DictReader(f))
    assert {r["attention"] for r in exported} == {"sdpa", "linear_elu", "no_mixing", "only_here"}


def test_no_figure_with_a_single_width(tmp_path):
    one = [r for r in sweep() if r.cell.task_params["d_model"] == 64]
    db = write_store(tmp_path / "cab.sqlite", one)
    with ResultStore(db) as s:
        assert accuracy(Tables.from_frames(s.dataframe()), set()).recall_width == ()
    html = render_report(db, tmp_path / "site", fidelity_budget_s=0).read_text(encoding="utf-8")
    assert parse(html).by_id("recall-width") is None and "Recall versus width" not in html


def test_the_boards_keep_each_setting_of_a_sweep_apart(acc):
    """The sweep's settings are columns of their own on the board, named by the parameters that differ; never
    seeds of one 'recall' column (sdpa's CS accuracy at L=128, width 64: its 3 seeds, not 7 results pooled)."""
    cs = next(b for b in acc.boards if b.pattern == "CS")
    titles = {c.task for c in cs.columns}
    assert titles == {f"recall[d_model={w}, length={n}, pairs=[{p}]]" for (n, p), per in ACCURACY.items()
                      for w in (64, 128)}
    column = cs.columns.index(next(c for c in cs.columns if c.task == "recall[d_model=64, length=128, pairs=[8]]"))
    sdpa = next(r for r in cs.rows if r.label == "sdpa").scores[column]
    assert sdpa.n == 3 and math.isclose(sdpa.mean, 0.99)
    ns = next(b for b in acc.boards if b.pattern == "NS")  # the NS result's setting is one of the sweep's
    assert [c.task for c in ns.columns] == ["recall[d_model=64, length=128, pairs=[8]]"]


def test_the_state_size_view_plots_the_longest_widest_setting_of_a_sweep(store):
    """Of the sweep's four recall settings, "Recall versus state size" takes the longest sequences, then the
    widest model (L=256, width 128), and matches decode states at that length; a single setting keeps its
    plain name."""
    from cab.report.leaderboard import _recall_setting

    with ResultStore(store) as s:
        assert _recall_setting(s.dataframe()) == ("recall[d_model=128, length=256, pairs=[16]]", 256)
    one = [r for r in sweep() if r.cell.task_params["d_model"] == 64 and r.cell.lq == 128]
    with ResultStore(write_store(store.parent / "one.sqlite", one)) as s:
        assert _recall_setting(s.dataframe()) == ("recall", 128)


def test_the_sweep_columns_are_in_numeric_order(acc):
    """Width 64 before 128 (numbers compared as numbers, not as text), then length."""
    cs = next(b for b in acc.boards if b.pattern == "CS")
    assert [c.task for c in cs.columns] == [
        "recall[d_model=64, length=128, pairs=[8]]", "recall[d_model=64, length=256, pairs=[16]]",
        "recall[d_model=128, length=128, pairs=[8]]", "recall[d_model=128, length=256, pairs=[16]]"]
