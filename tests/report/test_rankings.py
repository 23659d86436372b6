"""The main page of a store as large as the quick run's (many attentions, four patterns): rankings first, one
per pattern and sorted by the time ratio to sdpa, the gate on every row, no empty section, plots of at most 12
series with their legend inside the image, and a page small enough to read."""

from __future__ import annotations

import base64
import random
import re

import pytest

from cab.report import render_report
from cab.report.aggregate import build_page
from cab.report.costs import plotted_rows
from cab.report.load import read_tables
from cab.report.plots import Series, line_panels
from cab.report.support import registry_declarations
from cab.status import Status
from tests.report.test_report import Node, bench, check, parse, ranking_rows, squash, timing, write_store

PATTERNS = ("NS", "CS", "NC", "CC")
COVERAGE = {"shapes": ["main: B=2 Hq=4 Hkv=4 Lq=48 Lk=48 D=32", "published: B=1 Hq=4 Hkv=4 Lq=1024 Lk=1024 D=64"],
            "dtypes": {"structural": "float64", "requested": "float32"}, "backends": {"float32": "torch"}}


def many_results(n: int = 60) -> list:
    """sdpa, vanilla and n made-up attentions, checked and timed at 256 and 1024 in every pattern; one fails
    its CS checks (speed withheld), one runs out of memory at 1024."""
    rng = random.Random(0)
    names = ["sdpa", "vanilla"] + [f"attention_with_a_long_name_{i:02d}" for i in range(n)]
    results = []
    for name in names:
        for pattern in PATTERNS:
            failing = name.endswith("_03") and pattern == "CS"
            results.append(check(name, pattern, Status.INCORRECT if failing else Status.OK,
                                 [{"name": "forward", "status": "incorrect" if failing else "ok"}]))
            scale = rng.uniform(0.3, 3.0)
            for length in (256, 1024):
                if name.endswith("_04") and length == 1024:
                    results.append(bench(name, pattern, length, Status.OOM, message="out of memory"))
                    continue
                ms = scale * (length / 256) ** rng.uniform(1.0, 2.0)
                results.append(bench(name, pattern, length, metrics=timing(
                    ms, ms * 0.9, ms * 1.2, mem_mib=ms, gate="ok", gate_coverage=COVERAGE)))
    return results


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    root = tmp_path_factory.mktemp("big")
    db = write_store(root / "cab.sqlite", many_results())
    index = render_report(db, root / "site", fidelity_budget_s=0)
    return db, index, parse(index.read_text(encoding="utf-8"))


def test_rankings_come_first_one_per_pattern_sorted_by_the_time_ratio(big):
    _, _, tree = big
    sections = [n.attrs.get("id") for n in tree.find_all("main")[0].children if isinstance(n, Node)]
    assert sections[:2] == ["overview", "rankings"]
    for pattern in PATTERNS:
        rows = ranking_rows(tree.by_id(f"rank-{pattern}"))
        names = [name for name, _ in rows]
        assert {"sdpa", "vanilla"} <= set(names) and len(names) == 12  # the top 10 and both baselines
        ratios = [float(cells["Time ÷ sdpa"].split("×")[0]) for _, cells in rows if "×" in cells["Time ÷ sdpa"]]
        assert ratios == sorted(ratios) and len(ratios) >= 11
        assert dict(rows)["sdpa"]["Time ÷ sdpa"].startswith("1×")
        for _, cells in rows:  # the gate verdict on every row, its coverage in the tooltip
            assert cells["Gate"] in ("checked", "withheld", "failing")
    gates = [n for n in tree.by_id("rank-NS").iter() if "gate" in n.classes()]
    assert gates and all("published B=1" in g.attrs["title"] for g in gates)


def test_pattern_pages_hold_every_row_and_the_withheld_and_failed_ones(big):
    _, index, _ = big
    cs = parse((index.parent / "pattern" / "CS.html").read_text(encoding="utf-8"))
    rows = dict(ranking_rows(cs.by_id("rank-CS")))
    assert len(rows) == 62
    assert rows["attention_with_a_long_name_03"]["Gate"] == "withheld"  # its CS checks fail
    assert rows["attention_with_a_long_name_04"]["Time ÷ sdpa"] == "oom"
    assert cs.by_id("eff-CS-fwd-float32-cpu-b1-h4-kv4-d64") is not None


def test_no_section_is_empty_and_the_page_is_small(big):
    _, index, tree = big
    for section in (n for n in tree.find_all("main")[0].children if isinstance(n, Node)):
        content = [c for c in section.children if isinstance(c, Node) and c.tag != "h2"]
        assert content, section.attrs.get("id")
        if "one-line" in section.classes():  # an empty section is one line naming the command or page
            assert len(content) == 1 and (content[0].find_all("code") or content[0].find_all("a"))
    assert "Nothing to show" not in squash(tree)
    assert index.stat().st_size <= 2_000_000


def test_plots_draw_at_most_twelve_series(big):
    db, _, _ = big
    page = build_page(read_tables(db), {})
    assert page.efficiency and all(len(plotted_rows(t)) <= 12 for t in page.efficiency)
    assert {"sdpa", "vanilla"} <= {r.name for r in plotted_rows(page.efficiency[0])}


def test_the_legend_is_inside_the_image():
    names = [f"a_rather_long_attention_name_{i}" for i in range(12)]
    plot = line_panels([("t", "L", "ms", [Series(n, (256, 1024), (1.0 + i, 4.0 + i)) for i, n in enumerate(names)])],
                       loglog=True, alt="a")
    svg = base64.b64decode(plot.uri.split(",", 1)[1]).decode("utf-8")
    width = float(re.search(r'<svg[^>]* width="([\d.]+)pt"', svg).group(1))
    for name in names:  # each legend label starts left of the right edge with room for its text
        label = re.search(r'translate\(([\d.]+) [\d.]+\)[^>]*>' + name, svg) or \
            re.search(r'x="([\d.]+)"[^>]*>' + name, svg)
        assert label is not None, name
        assert float(label.group(1)) + 0.35 * 7.5 * len(name) <= width + 1, name


def test_the_negative_control_is_listed_last_without_a_rank(tmp_path):
    """no_mixing (family control) mixes nothing, so it is the fastest row; its speed is no attention's: it
    comes after the ranked rows, unranked, out of the main page's top, and the caption says why."""
    results = []
    for name, ms in (("sdpa", 4.0), ("vanilla", 8.0), ("no_mixing", 0.3), ("linear_elu", 1.5)):
        results.append(check(name, "NS", Status.OK, [{"name": "forward", "status": "ok"}]))
        for length in (256, 1024):
            results.append(bench(name, "NS", length, metrics=timing(ms * length / 256, ms * length / 300,
                                                                     ms * length / 200, mem_mib=ms, gate="ok",
                                                                     gate_coverage=COVERAGE)))
    db = write_store(tmp_path / "cab.sqlite", results)
    page = build_page(read_tables(db), registry_declarations(["sdpa", "vanilla", "no_mixing", "linear_elu"]))
    (ranking,) = page.rankings
    assert [(r.attention, r.rank) for r in ranking.rows] == [
        ("linear_elu", 1), ("sdpa", 2), ("vanilla", 3), ("no_mixing", None)]
    assert ranking.controls == ("no_mixing",) and "no_mixing" not in {r.attention for r in ranking.top()}
    index = render_report(db, tmp_path / "site", fidelity_budget_s=0)
    pattern_page = parse((index.parent / "pattern" / "NS.html").read_text(encoding="utf-8"))
    assert "Last, unranked: no_mixing, the negative control of the task boards" in squash(pattern_page)
