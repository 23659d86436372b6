"""Whether a task board measures attention: exact attention against the negative control (no_mixing) beyond
the 95% intervals, in the metric's direction; boards without the control or exact attention, or with one
seed, are unknown. From synthetic stores through the report (boards, HTML, export) and from summaries
directly (the rule and its direction)."""

from __future__ import annotations

import csv

import pandas as pd
import pytest

from cab.report import render_report
from cab.report.informative import INFORMATIVE, NOT_INFORMATIVE, UNKNOWN, judge
from cab.report.leaderboard import accuracy
from cab.store import ResultStore
from cab.tables import Tables
from cab.training.summary import long_metrics, summary_table
from tests.report.test_report import parse, squash, table_cells, write_store
from tests.report.test_report_tasks import task

# per seed (3 seeds); t(0.975, 2) * sd / sqrt(3) = 2.48 * sd is each half width
VALUES = {
    # recall CS, accuracy (higher is better): exact far above the control -> informative
    ("recall", "CS", "accuracy"): {"vanilla": [0.90, 0.95, 1.00], "no_mixing": [0.10, 0.12, 0.11],
                                   "performer": [0.50, 0.55, 0.60]},
    # lm CS, bpc (lower is better): exact and the control overlap -> not informative
    ("lm", "CS", "bpc"): {"vanilla": [3.69, 3.70, 3.68], "no_mixing": [3.70, 3.69, 3.71],
                          "performer": [3.60, 3.61, 3.59]},
    # forecast NC, mse (lower is better), sdpa but no vanilla: the control is better -> not informative
    ("forecast", "NC", "mse"): {"sdpa": [0.30, 0.31, 0.29], "no_mixing": [0.20, 0.21, 0.19]},
    # listops NS: exact attention but no control -> unknown
    ("listops", "NS", "accuracy"): {"vanilla": [0.40, 0.45, 0.50], "performer": [0.20, 0.25, 0.30]},
    # lookup CC: the control but no exact attention -> unknown
    ("lookup", "CC", "exact_match"): {"no_mixing": [0.0, 0.0, 0.01], "performer": [0.5, 0.6, 0.7]},
    # recall NS: one seed each -> unknown (no interval)
    ("recall", "NS", "accuracy"): {"vanilla": [0.99], "no_mixing": [0.10]},
}
OTHER_METRICS = {"forecast": "mae", "lookup": "token_accuracy"}  # second metrics the tasks also report


def results():
    out = []
    for (name, pattern, metric), per_attention in VALUES.items():
        for attention, values in per_attention.items():
            for seed, value in enumerate(values):
                metrics = {metric: value}
                if name in OTHER_METRICS:
                    metrics[OTHER_METRICS[name]] = value
                out.append(task(attention, pattern, name, seed, metrics))
    return out


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_store(tmp_path_factory.mktemp("informative") / "cab.sqlite", results())


@pytest.fixture(scope="module")
def boards(store):
    with ResultStore(store, readonly=True) as s:
        frame = s.dataframe()
    return {b.pattern: b for b in accuracy(Tables.from_frames(frame), set()).boards}


@pytest.fixture(scope="module")
def site(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    html = render_report(store, out, fidelity_budget_s=0).read_text(encoding="utf-8")
    return out, parse(html)


# the verdicts on the boards -------------------------------------------------------------------------------

def test_exact_beyond_the_intervals_is_informative(boards):
    v = boards["CS"].verdict("recall")
    assert (v.state, v.exact, v.control, v.metric) == (INFORMATIVE, "vanilla", "no_mixing", "accuracy")
    assert v.exact_summary.mean == pytest.approx(0.95) and v.control_summary.mean == pytest.approx(0.11)
    assert v.message.startswith("informative: exact attention (vanilla) 0.95 ± ")


def test_overlapping_intervals_are_not_informative_and_say_both_numbers(boards):
    v = boards["CS"].verdict("lm")
    assert (v.state, v.metric, v.direction) == (NOT_INFORMATIVE, "bpc", -1)
    assert "does not beat the negative control" in v.message
    assert "(vanilla) 3.69 ± " in v.message and "(no_mixing) 3.7 ± " in v.message and "lower is better" in v.message
    assert [u.task for u in boards["CS"].uninformative] == ["lm"]


def test_a_control_better_than_exact_attention_is_not_informative_with_sdpa_as_exact(boards):
    v = boards["NC"].verdict("forecast")
    assert (v.state, v.exact, v.metric) == (NOT_INFORMATIVE, "sdpa", "mse")  # mse: forecast's first metric
    assert "the negative control beats exact attention" in v.message and "(sdpa) 0.3 ± " in v.message


def test_boards_without_the_control_or_exact_attention_or_an_interval_are_unknown(boards):
    assert boards["NS"].verdict("listops").message == "informativeness unknown: add no_mixing"
    assert boards["CC"].verdict("lookup").message == "informativeness unknown: add vanilla"
    one_seed = boards["NS"].verdict("recall")
    assert one_seed.state == UNKNOWN and "one seed gives no interval" in one_seed.message
    assert "(vanilla) 0.99 (n=1)" in one_seed.message  # the numbers, without an interval
    assert all(v.state == UNKNOWN for v in (boards["NS"].verdict("listops"), boards["CC"].verdict("lookup")))


def test_the_control_is_ranked_but_left_out_of_the_index(boards):
    rows = {r.label: r for r in boards["CS"].rows}
    assert rows["no_mixing"].control and rows["no_mixing"].index is None
    assert not rows["vanilla"].control
    # two tasks; per (task, metric) z over vanilla and performer only: recall vanilla 0.95 vs performer 0.55
    # -> z = +1 / -1; lm vanilla 3.69 vs performer 3.60 (lower is better) -> z = -1 / +1; index 0 for both
    assert rows["vanilla"].index == pytest.approx(0.0) and rows["performer"].index == pytest.approx(0.0)
    assert "no_mixing" not in " ".join(boards["CS"].reference)
    # its scores are on the board and ranked with the others
    column = [c.title for c in boards["CS"].columns].index("recall · accuracy ↑")
    assert rows["no_mixing"].scores[column].rank == 3


# the rule and the metric's direction --------------------------------------------------------------------

def _summary(values: "dict[str, list[float]]", direction: int) -> pd.DataFrame:
    long = pd.DataFrame([("t", "CS", name, seed, "m", value, direction, True)
                         for name, xs in values.items() for seed, value in enumerate(xs)],
                        columns=["task", "pattern", "attention", "seed", "metric", "value", "direction", "index"])
    return summary_table(long)


@pytest.mark.parametrize("direction,state", [(1, INFORMATIVE), (-1, NOT_INFORMATIVE)])
def test_the_metrics_direction_decides_which_side_is_better(direction, state):
    values = {"vanilla": [0.8, 0.82, 0.81], "no_mixing": [0.2, 0.22, 0.21]}
    names = {"vanilla": "vanilla", "no_mixing": "no_mixing"}
    v = judge(_summary(values, direction), "t", "CS", "m", direction, names)
    assert v.state == state
    assert ("higher is better" if direction > 0 else "lower is better") in v.message
    if state == NOT_INFORMATIVE:  # lower is better: the control's 0.21 beats exact attention's 0.81
        assert "the negative control beats exact attention" in v.message


def test_vanilla_is_preferred_to_sdpa_and_a_labelled_setting_counts():
    values = {"vanilla": [0.5, 0.5, 0.5], "sdpa": [0.9, 0.9, 0.9], "no_mixing": [0.1, 0.1, 0.1]}
    names = {n: n for n in values}
    v = judge(_summary(values, 1), "t", "CS", "m", 1, names)
    assert v.exact == "vanilla" and v.state == INFORMATIVE
    labelled = {"ctl": [0.7, 0.71, 0.69], "sdpa(x)": [0.7, 0.72, 0.68]}
    v = judge(_summary(labelled, 1), "t", "CS", "m", 1, {"ctl": "no_mixing", "sdpa(x)": "sdpa"})
    assert (v.exact, v.control, v.state) == ("sdpa(x)", "ctl", NOT_INFORMATIVE)
    v = judge(_summary({"performer": [0.1, 0.2]}, 1), "t", "CS", "m", 1, {"performer": "performer"})
    assert v.message == "informativeness unknown: add no_mixing and vanilla"


def test_long_metrics_of_the_store_match_the_fixture(store):
    with ResultStore(store, readonly=True) as s:
        long = long_metrics(s.dataframe())
    assert set(long["attention"]) == {"vanilla", "sdpa", "no_mixing", "performer"}


# the rendered report ------------------------------------------------------------------------------------

def test_the_page_marks_uninformative_boards_and_says_why(site):
    _, tree = site
    alert = squash(tree.by_id("uninformative-boards"))
    assert alert.startswith("2 task boards do not measure attention") and "lm CS" in alert and "forecast NC" in alert
    cs = tree.by_id("board-CS")
    headers = {squash(th): th for th in cs.find_all("thead")[0].find_all("th")}
    lm = headers["lm · bpc ↓ not informative"]
    badge = next(n for n in lm.iter() if "info-not-informative" in n.classes())
    assert "(vanilla) 3.69" in badge.attrs["title"] and "(no_mixing) 3.7" in badge.attrs["title"]
    assert "recall · accuracy ↑" in headers  # informative: no badge
    section = tree.by_id("board-CS-section")
    items = {squash(li) for li in section.find_all("li") if "informativeness" in li.attrs.get("class", "") or
             any(c.startswith("info-") for c in li.classes())}
    assert any(i.startswith("lm (bpc): not informative:") for i in items)
    assert any(i.startswith("recall (accuracy): informative:") for i in items)
    ns = {squash(li) for li in tree.by_id("board-NS-section").find_all("li")}
    assert "listops (accuracy): informativeness unknown: add no_mixing" in ns
    grid = table_cells(cs)
    assert "control" in grid["no_mixing control"]["Attention"].text


def test_the_verdicts_are_exported(site):
    out, tree = site
    links = [a.attrs["href"] for a in tree.by_id("leaderboards").find_all("a")]
    assert "tables/board-informativeness.csv" in links and "tables/board-informativeness.md" in links
    rows = list(csv.DictReader((out / "tables" / "board-informativeness.csv").open(encoding="utf-8")))
    by_board = {(r["task"], r["pattern"]): r for r in rows}
    assert len(rows) == len(VALUES)
    lm = by_board[("lm", "CS")]
    assert (lm["state"], lm["exact"], lm["control"], lm["better"]) == ("not informative", "vanilla", "no_mixing",
                                                                       "lower")
    assert float(lm["exact_mean"]) == pytest.approx(3.69) and float(lm["control_mean"]) == pytest.approx(3.70)
    assert by_board[("listops", "NS")]["control"] == "" and by_board[("listops", "NS")]["state"] == "unknown"
