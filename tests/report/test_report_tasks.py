"""The leaderboard's accuracy side and what surrounds it: per-pattern boards with hand-computed 95% intervals
and ties, the compositional index and its difference to vanilla, rank correlations, the Pareto front, the
extrapolation and recall figures, CSV / Markdown exports (missing stays missing), per-attention pages with
safe file names, escaping of hostile names, and the fidelity section's budget."""

from __future__ import annotations

import csv
import math

import pytest

from cab.cells import Cell, Result
from cab.report import render_report
from cab.report.export import to_csv, to_markdown
from cab.report.fidelity import fidelity
from cab.report.leaderboard import accuracy, board_frame, pareto_front
from cab.report.pages import page_file
from cab.report.ranks import average_ranks, kendall_tau_b, pattern_correlations, spearman
from cab.status import Status
from cab.store import ResultStore
from cab.tables import Tables
from tests.report.test_report import HOSTILE, PROVENANCE, bench, parse, squash, table_cells, timing, write_store

T_975_2 = 4.302652729911275  # Student t quantile, 0.975, 2 degrees of freedom (tables)
RECALL = {  # per-seed recall accuracy in CS; NS gets a different ordering
    "vanilla": [0.9, 0.8, 1.0],     # mean 0.9, sd 0.1
    "performer": [0.3, 0.4, 0.2],   # mean 0.3, sd 0.1: separated from vanilla
    "cosformer": [0.35, 0.3, 0.4],  # mean 0.35, sd 0.05: overlaps performer
    HOSTILE: [0.1, 0.1, 0.1],       # a plugin with a hostile name, no spread
}


def task(attention: str, pattern: str, name: str, seed: int, metrics: dict, status: Status = Status.OK,
         length: int = 64) -> Result:
    cell = Cell(kind="task", attention=attention, pattern=pattern, seed=seed, mode="train", task=name,
                task_params={"length": length}, lq=length, lk=length)
    return Result(cell, status, metrics=metrics, provenance=PROVENANCE, started_at="2025-01-01T00:00:00+00:00",
                  finished_at="2025-01-01T00:01:00+00:00")


def task_results() -> "list[Result]":
    results = []
    for name, values in RECALL.items():
        for seed, value in enumerate(values):
            results.append(task(name, "CS", "recall", seed, {"accuracy": value, "chance": {"accuracy": 0.125}}))
            results.append(task(name, "NS", "recall", seed, {"accuracy": 1.0 - value}))
    for seed, (a, b) in enumerate([(3.0, 3.2), (3.1, 3.3), (2.9, 3.1)]):
        for name, bpc in (("vanilla", a), ("performer", b)):
            curve = [{"length": 32, "bpc": bpc + 0.1}, {"length": 64, "bpc": bpc},
                     {"length": 128, "bpc": None, "status": "oom"} if name == "vanilla" else
                     {"length": 128, "bpc": bpc + 0.5}]
            results.append(task(name, "CS", "lm", seed, {"bpc": bpc, "extrapolation": curve}))
    results.append(task("cosformer", "CS", "lm", 0, {}, status=Status.ERROR))
    # forward timings at 128 (the Pareto plot's cost) and decode state sizes (recall vs state)
    for name, ms, sparsity in (("vanilla", 4.0, None), ("performer", 1.0, 0.5), ("cosformer", 2.0, None)):
        extra = {"backend": "torch"} | ({"achieved_sparsity": sparsity} if sparsity is not None else {})
        results.append(bench(name, "CS", 128, metrics=timing(ms, ms * 0.9, ms * 1.1, mem_mib=1, **extra)))
    decode = Cell(kind="bench", attention="vanilla", pattern="CS", lq=1, lk=64, mode="decode")
    results.append(Result(decode, Status.OK, metrics={"median_ms": 0.1, "p20_ms": 0.09, "p80_ms": 0.11,
                                                      "context": 64, "state_bytes": 65536, "tokens_per_s": 1e4},
                          provenance=PROVENANCE))
    return results


@pytest.fixture(scope="module")
def frame(tmp_path_factory):
    db = write_store(tmp_path_factory.mktemp("tasks") / "cab.sqlite", task_results())
    with ResultStore(db) as store:
        return store.dataframe(), db


@pytest.fixture(scope="module")
def boards(frame):
    results, _ = frame
    return {b.pattern: b for b in accuracy(Tables.from_frames(results), set()).boards}


@pytest.fixture(scope="module")
def site(frame, tmp_path_factory):
    _, db = frame
    out = tmp_path_factory.mktemp("site")
    index = render_report(db, out, fidelity_budget_s=0)
    html = index.read_text(encoding="utf-8")
    return out, html, parse(html)


# aggregation against hand-computed values -------------------------------------------------------------

def test_board_scores_are_mean_and_t_interval_half_width(boards):
    cs = boards["CS"]
    column = [c.title for c in cs.columns].index("recall · accuracy ↑")
    scores = {row.label: row.scores[column] for row in cs.rows}
    half = T_975_2 * 0.1 / math.sqrt(3)  # 0.248414...
    assert scores["vanilla"].mean == pytest.approx(0.9) and scores["vanilla"].half == pytest.approx(half)
    assert scores["cosformer"].half == pytest.approx(T_975_2 * 0.05 / math.sqrt(3))
    assert scores[HOSTILE].half == pytest.approx(0.0) and scores[HOSTILE].n == 3
    # vanilla [0.651, 1.148] is separated from all; performer [0.052, 0.548] and cosformer [0.226, 0.474]
    # overlap: both rank 2, tied within noise; HOSTILE's [0.1, 0.1] lies below cosformer's, inside performer's
    assert (scores["vanilla"].rank, scores["vanilla"].best, scores["vanilla"].tied) == (1, True, ())
    assert scores["performer"].rank == scores["cosformer"].rank == 2
    assert set(scores["performer"].tied) == {"cosformer"} and not scores["performer"].best
    assert (scores[HOSTILE].rank, scores[HOSTILE].tied) == (3, ())
    assert scores["performer"].delta == pytest.approx(0.3 - 0.9) and scores["vanilla"].delta is None
    assert cs.chance[column] == pytest.approx(0.125)


def test_board_index_and_difference_to_vanilla(boards):
    ns = boards["NS"]
    # NS recall means: vanilla 0.1, performer 0.7, cosformer 0.65, HOSTILE 0.9; mu is their mean,
    # sigma (population) = sqrt(mean of squared deviations); one task, one metric: the index is z itself
    means = {"vanilla": 0.1, "performer": 0.7, "cosformer": 0.65, HOSTILE: 0.9}
    mu = sum(means.values()) / 4
    sigma = math.sqrt(sum((v - mu) ** 2 for v in means.values()) / 4)
    rows = {r.label: r for r in ns.rows}
    for name, mean in means.items():
        assert rows[name].index == pytest.approx((mean - mu) / sigma)
        assert rows[name].delta_index == pytest.approx((mean - 0.1) / sigma)
    assert [r.label for r in ns.rows] == [HOSTILE, "performer", "cosformer", "vanilla"]  # sorted by index
    assert rows["performer"].n_tasks == 1


def test_missing_scores_are_missing_not_zero(boards):
    cs = boards["CS"]
    column = [c.title for c in cs.columns].index("lm · bpc ↓")
    rows = {r.label: r for r in cs.rows}
    assert rows["cosformer"].scores[column].missing  # its lm cell failed
    assert rows["performer"].sparsity == pytest.approx(0.5) and rows["vanilla"].sparsity is None
    assert rows["performer"].backend == "torch"


def test_rank_correlations_match_hand_computed_values():
    assert average_ranks([10, 20, 20, 5]) == [2.0, 3.5, 3.5, 1.0]
    x, y = [1, 2, 3, 4, 5], [2, 1, 4, 3, 5]
    # d = ranks differences (-1, 1, -1, 1, 0): rho = 1 - 6*4 / (5*24) = 0.8
    assert spearman(x, y) == pytest.approx(0.8)
    # pairs: 10, discordant (1,2) and (3,4): tau = (8 - 2) / 10
    assert kendall_tau_b(x, y) == pytest.approx(0.6)
    assert spearman(x, [5, 4, 3, 2, 1]) == pytest.approx(-1.0)
    # tau-b with ties: x = (1, 2, 2, 3), y = (1, 2, 3, 3): C = 4, D = 0, ties in x 1, in y 1 -> 4 / 5
    assert kendall_tau_b([1, 2, 2, 3], [1, 2, 3, 3]) == pytest.approx(0.8)
    assert spearman([1, 2], [2, 1]) is None and kendall_tau_b([1, 1, 1], [1, 2, 3]) is None
    rows = pattern_correlations({"NS": {"a": 1, "b": 2, "c": 3}, "CS": {"a": 3, "b": 2, "c": 1, "d": 0}},
                                ["NS", "CS"])
    cross = next(r for r in rows if (r["pattern_a"], r["pattern_b"]) == ("NS", "CS"))
    assert (cross["n"], cross["spearman"], cross["kendall"]) == (3, pytest.approx(-1.0), pytest.approx(-1.0))


def test_pareto_front_keeps_the_undominated():
    points = [("fast-bad", 1.0, -1.0), ("slow-good", 10.0, 1.0), ("dominated", 12.0, 0.5), ("mid", 3.0, 0.0)]
    assert pareto_front(points) == ["fast-bad", "slow-good", "mid"]


# the rendered report ------------------------------------------------------------------------------------

def test_boards_render_intervals_ties_and_chance(site):
    _, _, tree = site
    grid = table_cells(tree.by_id("board-CS"))
    vanilla = grid["vanilla"]["recall · accuracy ↑"]
    assert squash(vanilla).startswith("0.9 ± 0.25 n=3 · rank 1") and "best" in vanilla.classes()
    performer = grid["performer"]["recall · accuracy ↑"]
    tie = [n for n in performer.iter() if "tie" in n.classes()]
    assert tie and "cosformer" in tie[0].attrs["title"] and "Δ vanilla -0.6" in squash(performer)
    assert squash(grid["cosformer"]["lm · bpc ↓"]) == "—"
    assert "chance level" in squash(tree.by_id("board-CS").find_all("tfoot")[0])
    assert squash(grid["performer"]["Achieved sparsity"]) == "0.5"
    assert squash(grid["vanilla"]["Achieved sparsity"]) == "—"


def test_every_attention_link_resolves_to_a_page(site):
    out, html, tree = site
    links = [a.attrs["href"] for a in tree.find_all("a") if "attn" in a.classes()]
    assert links and all((out / link).is_file() for link in links)
    hostile_page = out / page_file(HOSTILE)
    assert hostile_page.parent == out / "attention" and hostile_page.is_file()
    page = parse(hostile_page.read_text(encoding="utf-8"))
    assert squash(page.by_id("attention-name")) == HOSTILE
    assert page.by_id("back-to-index").attrs["href"] == "../index.html"
    assert "<script>alert" not in hostile_page.read_text(encoding="utf-8")
    assert html.count("<script") == 1


def test_page_file_names_are_safe_and_distinct():
    names = [HOSTILE, "../../etc/passwd", "a/b", "a-b", "a b", "", "名前", "x" * 300, "con", ".hidden"]
    files = [page_file(n) for n in names]
    assert len(set(files)) == len(files)
    for f in files:
        folder, name = f.split("/")
        assert folder == "attention" and name.endswith(".html") and len(name) <= 64
        assert all(c.isalnum() or c in "-_." for c in name) and not name.startswith(".")


def test_figures_are_embedded_and_sections_filled(site):
    _, html, tree = site
    figures = {img.attrs["alt"]: img.attrs["src"] for img in tree.find_all("img")}
    assert any("evaluation length" in alt for alt in figures)
    assert any("forward time" in alt for alt in figures)  # Pareto
    assert any("rank correlation" in alt for alt in figures)
    assert any("recall accuracy" in alt for alt in figures)
    assert all(src.startswith("data:image/svg+xml;base64,") for src in figures.values())
    assert "http://" not in html and "https://" not in html  # the SVGs' namespaces live inside base64
    assert "not measured in this report" in squash(tree.by_id("fidelity"))


def test_exports_sit_beside_the_page_with_missing_left_empty(site):
    out, _, tree = site
    board = out / "tables" / "board-CS.csv"
    rows = list(csv.DictReader(board.open(encoding="utf-8")))
    by_name = {r["attention"]: r for r in rows}
    assert by_name["cosformer"]["lm.bpc.mean"] == ""  # missing, not 0
    assert float(by_name["vanilla"]["recall.accuracy.mean"]) == pytest.approx(0.9)
    markdown = (out / "tables" / "board-CS.md").read_text(encoding="utf-8")
    assert "| attention |" in markdown and "—" in markdown and "\\|" not in markdown.split("\n")[2][:2]
    for link in tree.find_all("a"):
        href = link.attrs.get("href", "")
        if href.startswith("tables/"):
            assert (out / href).is_file()


def test_figure_text_from_plugins_is_escaped_inside_the_svg():
    import base64

    from cab.report.plots import scatter

    plot = scatter([(HOSTILE, 1.0, 2.0, None, None), ("b", 2.0, 1.0, None, None)], xlabel="x (ms)", ylabel="y",
                   title=HOSTILE, alt="a")
    svg = base64.b64decode(plot.uri.split(",", 1)[1]).decode("utf-8")
    assert "<script" not in svg and "&lt;script&gt;alert(1)&lt;/script&gt;" in svg


def test_overview_counts_task_results(site):
    _, _, tree = site
    assert "task)" in squash(tree.by_id("overview")).split("results")[1][:40]


def test_csv_and_markdown_escape_and_keep_missing():
    import pandas as pd

    frame = pd.DataFrame([{"name": "a|b", "value": None, "n": 3}, {"name": "x\ny", "value": 0.5, "n": None}])
    assert to_csv(frame).splitlines()[1:] == ["a|b,,3", '"x', 'y",0.5,']
    md = to_markdown(frame, "T").splitlines()
    assert md[2] == "| name | value | n |" and md[4] == "| a\\|b | — | 3 |" and md[5] == "| x y | 0.5 | — |"


def test_fidelity_measures_within_its_budget():
    measured = fidelity([("vanilla", "NS")], budget_s=60, dtypes=("bfloat16",))
    (exact,) = measured.rows
    assert exact.random == pytest.approx(0.0, abs=1e-12) and exact.structured == pytest.approx(0.0, abs=1e-12)
    error, eager = exact.deviation["bfloat16"]
    assert 0 < error and error == pytest.approx(eager)  # eager attention is its own yardstick
    assert list(measured.frame.columns).count("deviation_bfloat16") == 1
    nothing = fidelity([("vanilla", "NS")], budget_s=1e-9)
    assert nothing.rows[0].random is None and "budget" in nothing.rows[0].note and not nothing.complete


def test_fidelity_interrupts_a_measurement_that_outlives_the_budget(monkeypatch):
    import time

    import cab.analysis.fidelity as analysis

    def slow(*args, **kwargs):  # an attention that compiles for a minute on first call
        deadline = time.perf_counter() + 60
        while time.perf_counter() < deadline:
            pass

    monkeypatch.setattr(analysis, "approximation_error", slow)
    started = time.perf_counter()
    measured = fidelity([("vanilla", "NS")], budget_s=0.3, isolated=False)
    assert time.perf_counter() - started < 10
    assert measured.rows[0].random is None and "ran out during it" in measured.rows[0].note


def test_a_store_without_tasks_says_so(tmp_path):
    db = write_store(tmp_path / "cab.sqlite", [bench("vanilla", "NS", 64, metrics=timing(1, 1, 1))])
    tree = parse(render_report(db, tmp_path / "site", fidelity_budget_s=0).read_text(encoding="utf-8"))
    assert tree.by_id("no-task-results") is not None
    assert "no extrapolation curves" in squash(tree.by_id("analyses"))


def test_cli_report_on_missing_and_partial_stores(tmp_path, capsys):
    from cab.cli import main

    assert main(["report", "--db", str(tmp_path / "none.sqlite"), "--out", str(tmp_path / "site")]) != 0
    assert "no results in" in capsys.readouterr().err
    db = write_store(tmp_path / "cab.sqlite", [task("vanilla", "CS", "recall", 0, {"accuracy": 0.5})])
    assert main(["report", "--db", str(db), "--out", str(tmp_path / "site")]) == 0
    assert (tmp_path / "site" / "index.html").is_file()


# cost beside accuracy (issue 20, goal 5) ------------------------------------------------------------------

def test_boards_carry_forward_time_and_memory_at_their_longest_task(tmp_path):
    results = [task("vanilla", "CS", "lm", 0, {"bpc": 3.0}, length=64),
               task("performer", "CS", "lm", 0, {"bpc": 3.2}, length=64),
               task("vanilla", "CS", "recall", 0, {"accuracy": 0.9}, length=32),
               bench("vanilla", "CS", 64, metrics=timing(2.0, 1.9, 2.1, mem_mib=3)),
               bench("vanilla", "CS", 32, metrics=timing(9.0, 8.9, 9.1, mem_mib=9)),  # the shorter task: not used
               bench("performer", "CS", 64, Status.ERROR, message="boom"),  # failed: no cost
               bench("vanilla", "NS", 64, metrics=timing(1.0, 0.9, 1.1))]  # no NS task: no NS board
    cross = Cell(kind="task", attention="vanilla", pattern="NC", seed=0, mode="train", task="forecast",
                 task_params={"history": 64}, lq=16, lk=64)
    results.append(Result(cross, Status.OK, metrics={"mse": 0.2}, provenance=PROVENANCE,
                          started_at="2025-01-01T00:00:00+00:00", finished_at="2025-01-01T00:01:00+00:00"))
    results.append(bench("vanilla", "NC", 64, metrics=timing(5.0, 4.9, 5.1, mem_mib=2)))  # Lq = Lk: the fallback
    db = write_store(tmp_path / "cab.sqlite", results)
    with ResultStore(db) as store:
        tables = Tables.from_frames(store.dataframe())
    boards = {b.pattern: b for b in accuracy(tables, set()).boards}
    cs = boards["CS"]
    assert "NS" not in boards  # a bench row alone makes no board
    assert "Lq=64 Lk=64" in cs.cost_shape and cs.cost_shape.startswith("forward")
    rows = {r.label: r for r in cs.rows}
    assert (rows["vanilla"].time_ms, rows["vanilla"].memory_bytes) == (2.0, 3 * 2 ** 20)
    assert (rows["performer"].time_ms, rows["performer"].memory_bytes) == (None, None)
    assert "Lq=64 Lk=64" in boards["NC"].cost_shape and boards["NC"].rows[0].time_ms == 5.0
    gated = {b.pattern: b for b in accuracy(tables, {("vanilla", "CS")}).boards}
    assert gated["CS"].cost_shape == ""  # a configuration whose gate failed reports no speed
    frame = board_frame(cs)
    assert [None if math.isnan(v) else v for v in frame["forward_ms"]] == [
        2.0 if r.label == "vanilla" else None for r in cs.rows]
