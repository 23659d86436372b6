"""The HTML leaderboard: aggregation of hand-built results, the support matrix, escaping, errors, sorting."""

from __future__ import annotations

import sqlite3
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

from cab import registry
from cab.attention.base import Attention
from cab.cells import Cell, Result
from cab.report import ReportError, render_report
from cab.report.aggregate import build_page
from cab.report.efficiency import efficiency_cell
from cab.report.html import figure
from cab.report.support import Declaration, support_matrix
from cab.status import Status
from cab.store import ResultStore
from cab.tables import Tables, typed_rows

HOSTILE = "<script>alert(1)</script>"
HOSTILE_CITATION = '<img src=x onerror="alert(3)">'
PROVENANCE = {"cab_version": "0.1.0", "git_sha": "abc123", "torch": "2.13.0", "device": "cpu",
              "device_name": "Test CPU", "python": "3.11.0", "threads": 2}
MIB = 2 ** 20


# building results ---------------------------------------------------------------------------------

def timing(median: float, p20: float, p80: float, mem_mib: "float | None" = None, **extra) -> dict:
    metrics = {"median_ms": median, "p20_ms": p20, "p80_ms": p80, "samples_ms": [p20, median, p80], **extra}
    if mem_mib is not None:
        metrics["peak_mem_bytes"] = int(mem_mib * MIB)
    return metrics


def bench(attention: str, pattern: str, lq: int, status: Status = Status.OK, metrics: "dict | None" = None,
          message: str = "", lk: "int | None" = None, **fields) -> Result:
    cell = Cell(kind="bench", attention=attention, pattern=pattern, lq=lq, lk=lk or lq, mode="fwd", **fields)
    return Result(cell, status, metrics=metrics or {}, message=message, provenance=PROVENANCE,
                  started_at="2025-01-01T00:00:00+00:00", finished_at="2025-01-01T00:01:00+00:00")


def check(attention: str, pattern: str, status: Status, checks: "list[dict] | None" = None, message: str = "",
          **fields) -> Result:
    cell = Cell(kind="check", attention=attention, pattern=pattern, **fields)
    metrics = {"verdict": status.value, "checks": checks or []}
    return Result(cell, status, metrics=metrics, message=message, provenance=PROVENANCE,
                  started_at="2025-01-01T00:00:00+00:00", finished_at="2025-01-01T00:02:00+00:00")


CAUSALITY_LEAK = {"name": "causality", "status": "incorrect", "error": 0.12, "tolerance": 1e-6,
                  "message": "row 3 depends on query 7"}

RESULTS = [
    # vanilla: registered built-in, checked and timed at two lengths
    check("vanilla", "NS", Status.OK, [{"name": "forward", "status": "ok", "error": 1e-7, "tolerance": 1e-5}]),
    bench("vanilla", "NS", 128, metrics=timing(1.5, 1.4, 1.7, mem_mib=4, tflops=0.25)),
    bench("vanilla", "NS", 256, metrics=timing(5.25, 5.0, 5.5, mem_mib=16, flops=2e9)),
    # sdpa: out of memory at 256, nothing at 512 (vanilla has no 512 either: sdpa is timed there)
    bench("sdpa", "NS", 128, metrics=timing(0.75, 0.7, 0.8, mem_mib=2, tflops=0.5, cv=0.09, high_cv=True)),
    bench("sdpa", "NS", 256, Status.OOM, message="RuntimeError: CPU out of memory"),
    bench("sdpa", "NS", 512, metrics=timing(3.0, 2.9, 3.1)),
    bench("sdpa", "NS", 1024, metrics={**timing(9.0, 8.0, 10.0), "mem_status": "oom", "mem_message": "killed"}),
    # leaky: not registered; declares CS (its check ran) but leaks the future; cross unsupported
    check("leaky", "NS", Status.OK),
    check("leaky", "CS", Status.INCORRECT, [{"name": "shape", "status": "ok"}, CAUSALITY_LEAK],
          message="causality: row 3 depends on query 7"),
    check("leaky", "NC", Status.UNSUPPORTED, message="leaky has no cross form"),
    bench("leaky", "CS", 128, metrics=timing(0.5, 0.45, 0.55)),
    bench("leaky", "NS", 128, metrics=timing(0.25, 0.2, 0.3)),
    # a hostile plugin name, label, message and hyper-parameter
    bench(HOSTILE, "NS", 128, Status.ERROR, message=f"ValueError: </pre>{HOSTILE}", label=HOSTILE,
          hparams={"w": "<b>bold</b>"}),
    check(HOSTILE, "NS", Status.TIMEOUT, message="cell exceeded its time limit of 1 s"),
    # evil_attn: registered by the test with a hostile citation; declares NS, CS and fails CS
    check("evil_attn", "NS", Status.OK),
    check("evil_attn", "CS", Status.ERROR, message="RuntimeError: boom"),
    check("evil_attn", "NC", Status.UNSUPPORTED, message="attention 'evil_attn' does not support pattern NC"),
    bench("evil_attn", "NS", 128, Status.SKIPPED, message="estimated memory above the limit"),
    # a cross-pattern table with Lq != Lk
    bench("vanilla", "NC", 64, lk=256, metrics=timing(0.125, 0.12, 0.13)),
]


@pytest.fixture(scope="module")
def evil_attn():
    @registry.register_attention("evil_attn", patterns=("NS", "CS"), family="test", exact=False,
                                 citation=HOSTILE_CITATION, unsupported={"NC": "<i>no cross</i>"})
    class EvilAttention(Attention):
        """A registered attention whose metadata is hostile text."""

        def forward(self, q, k, v, key_padding_mask=None):
            return q

    yield EvilAttention
    registry.unregister_attention("evil_attn")


def write_store(path: Path, results: "list[Result]", with_run: bool = True) -> Path:
    with ResultStore(path) as store:
        run_id = store.start_run("configs/quick.yaml", "cab run configs/quick.yaml", len(results), PROVENANCE) \
            if with_run else None
        for result in results:
            store.put(result, run_id)
        if run_id:
            store.finish_run(run_id, len(results), "finished")
    return path


# parsing the page ---------------------------------------------------------------------------------

VOID = {"meta", "br", "img", "hr", "input", "link"}


class Node:
    def __init__(self, tag: str, attrs: dict):
        self.tag, self.attrs, self.children = tag, attrs, []

    @property
    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text for c in self.children)

    def iter(self):
        for child in self.children:
            if isinstance(child, Node):
                yield child
                yield from child.iter()

    def find_all(self, tag: str) -> "list[Node]":
        return [n for n in self.iter() if n.tag == tag]

    def by_id(self, element_id: str) -> "Node | None":
        return next((n for n in self.iter() if n.attrs.get("id") == element_id), None)

    def classes(self) -> "set[str]":
        return set((self.attrs.get("class") or "").split())


class TreeParser(HTMLParser):
    """Builds a tree and fails on any mismatched closing tag (the page must be well formed)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = Node("#root", {})
        self.stack = [self.root]

    def handle_starttag(self, tag, attrs):
        node = Node(tag, dict(attrs))
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_endtag(self, tag):
        assert self.stack[-1].tag == tag, f"</{tag}> closes <{self.stack[-1].tag}>"
        self.stack.pop()

    def handle_data(self, data):
        self.stack[-1].children.append(data)


def parse(html: str) -> Node:
    parser = TreeParser()
    parser.feed(html)
    parser.close()
    assert parser.stack == [parser.root], "unclosed elements: " + ", ".join(n.tag for n in parser.stack[1:])
    return parser.root


def table_cells(table: Node) -> "dict[str, dict[str, Node]]":
    """{row header text: {column header text: cell}}."""
    headers = [th.text.strip() for th in table.find_all("thead")[0].find_all("th")]
    grid = {}
    for tr in table.find_all("tbody")[0].find_all("tr"):
        cells = [c for c in tr.children if isinstance(c, Node) and c.tag in ("th", "td")]
        grid[cells[0].text.strip()] = dict(zip(headers, cells))
    return grid


def ranking_rows(table: Node) -> "list[tuple[str, dict[str, str]]]":
    """A ranking table's rows in order: (attention, {column header: squashed text})."""
    headers = [th.text.strip() for th in table.find_all("thead")[0].find_all("th")]
    rows = []
    for tr in table.find_all("tbody")[0].find_all("tr"):
        cells = [c for c in tr.children if isinstance(c, Node) and c.tag in ("th", "td")]
        texts, i = {}, 0
        for cell in cells:  # a status spans the ratio columns
            for _ in range(int(cell.attrs.get("colspan") or 1)):
                texts[headers[i]] = squash(cell)
                i += 1
        rows.append((texts["Attention"], texts))
    return rows


def squash(node: Node) -> str:
    return " ".join(node.text.split())


@pytest.fixture(scope="module")
def site(tmp_path_factory, evil_attn) -> Path:
    root = tmp_path_factory.mktemp("report")
    db = write_store(root / "cab.sqlite", RESULTS)
    with ResultStore(db) as store:  # a second run whose config and command are hostile text
        store.start_run(f"configs/{HOSTILE}.yaml", 'cab run "><img src=x onerror=alert(4)>', 0, {})
    index = render_report(db, root / "site", fidelity_budget_s=0)
    assert index == root / "site" / "index.html"
    return index.parent


@pytest.fixture(scope="module")
def page(site) -> "tuple[str, Node, dict]":
    html = (site / "index.html").read_text(encoding="utf-8")
    keys = {(r.cell.attention, r.cell.kind, r.cell.pattern, r.cell.lq): r.key for r in RESULTS}
    return html, parse(html), keys


@pytest.fixture(scope="module")
def patterns(site) -> "dict[str, Node]":
    """The parsed pattern pages (pattern/<P>.html) that exist."""
    return {p: parse((site / "pattern" / f"{p}.html").read_text(encoding="utf-8"))
            for p in ("NS", "CS", "NC", "CC") if (site / "pattern" / f"{p}.html").is_file()}


# the page ---------------------------------------------------------------------------------------------

def test_page_has_the_stable_sections_tables_and_ids(page, site):
    html, tree, _ = page
    for element_id in ("overview", "rankings", "support", "leaderboards", "efficiency", "fidelity", "analyses",
                       "catalog", "failures", "support-matrix", "status-counts", "runs", "rank-NS"):
        assert tree.by_id(element_id) is not None, element_id
    assert parse((site / "catalog.html").read_text(encoding="utf-8")).by_id("catalog-table") is not None
    tables = tree.find_all("table")
    assert tables and all("sortable" in t.classes() for t in tables)
    ids = [n.attrs["id"] for n in tree.iter() if "id" in n.attrs]
    assert len(ids) == len(set(ids)), "duplicate element ids"
    assert "http://" not in html and "https://" not in html, "the page must not reach the network"
    assert len(tree.find_all("script")) == 1 and len(tree.find_all("style")) == 1


def test_efficiency_cells_show_median_spread_memory_and_throughput(patterns):
    grid = table_cells(patterns["NS"].by_id("eff-NS-fwd-float32-cpu-b1-h4-kv4-d64"))
    cell = grid["vanilla"]["128"]
    assert squash(cell) == "1.5 ms [1.4–1.7] 4 MiB 0.25 TFLOP/s"
    assert float(cell.attrs["data-sort"]) == 1.5
    # no tflops metric: computed from flops / median time (2e9 / 5.25 ms = 0.381 TFLOP/s)
    assert squash(grid["vanilla"]["256"]) == "5.25 ms [5–5.5] 16 MiB 0.381 TFLOP/s"
    assert "noisy" in squash(grid["sdpa"]["128"])
    # metrics that were not measured are shown missing, never as zero
    assert squash(grid["sdpa"]["512"]) == "3 ms [2.9–3.1] — MiB — TFLOP/s"
    assert squash(grid["sdpa"]["1024"]) == "9 ms [8–10] memory: oom — TFLOP/s"
    assert grid["sdpa"]["1024"].attrs["title"] == "killed"


def test_missing_results_are_dashes_and_failed_ones_their_status(page, patterns):
    _, _, keys = page
    grid = table_cells(patterns["NS"].by_id("eff-NS-fwd-float32-cpu-b1-h4-kv4-d64"))
    missing = grid["vanilla"]["512"]
    assert squash(missing) == "—" and "missing" in missing.classes() and missing.attrs["data-sort"] == ""
    oom = grid["sdpa"]["256"]
    assert squash(oom) == "oom" and "ms" not in oom.text
    assert oom.find_all("a")[0].attrs["href"] == f"../index.html#fail-{keys[('sdpa', 'bench', 'NS', 256)]}"
    assert squash(grid["evil_attn"]["128"]) == "skipped"
    assert squash(grid[HOSTILE]["128"]) == "error"


def test_speed_is_withheld_where_the_conformance_check_fails(patterns):
    grid = table_cells(patterns["CS"].by_id("eff-CS-fwd-float32-cpu-b1-h4-kv4-d64"))
    cell = grid["leaky"]["128"]
    assert "gated" in cell.classes() and "ms" not in cell.text and "0.5" not in cell.text
    # the same attention passes NS, so its NS speed is shown
    ns = table_cells(patterns["NS"].by_id("eff-NS-fwd-float32-cpu-b1-h4-kv4-d64"))
    assert squash(ns["leaky"]["128"]).startswith("0.25 ms")


def test_cross_lengths_are_labelled_with_both_lengths(patterns):
    grid = table_cells(patterns["NC"].by_id("eff-NC-fwd-float32-cpu-b1-h4-kv4-d64"))
    assert squash(grid["vanilla"]["64×256"]).startswith("0.125 ms")


def test_support_matrix_flags_declared_but_failing(page):
    _, tree, _ = page
    matrix = table_cells(tree.by_id("support-matrix"))
    assert "pass" in matrix["vanilla"]["NS"].classes() and squash(matrix["vanilla"]["NS"]) == "✓"
    assert matrix["vanilla"]["NS"].attrs["title"] == "pass: 1 check"
    assert "unchecked" in matrix["vanilla"]["CC"].classes()  # registered for CC, never checked
    # leaky is not registered: declarations are read from its check cells
    leaky = matrix["leaky"]
    assert "failing" in leaky["CS"].classes()
    assert "declared but failing" in squash(leaky["CS"])
    assert "causality: incorrect (error 0.12" in leaky["CS"].attrs["title"]
    assert "unsupported" in leaky["NC"].classes() and "leaky has no cross form" in leaky["NC"].attrs["title"]
    assert "unknown" in leaky["CC"].classes()
    assert squash(leaky["Declared by"]) == "check results"
    # evil_attn is registered: the registry's declarations and reasons win
    evil = matrix["evil_attn"]
    assert "failing" in evil["CS"].classes() and "error" in squash(evil["CS"])
    assert "unsupported" in evil["NC"].classes() and "<i>no cross</i>" in evil["NC"].attrs["title"]
    assert "unsupported" in evil["CC"].classes()
    assert squash(evil["Declared by"]) == "registry"
    rows = {squash(tr.find_all("th")[0]): tr.classes() for tr in tree.by_id("support-matrix").find_all("tr")[1:]}
    assert "has-failing" in rows["leaky"] and "has-failing" not in rows["vanilla"]
    alert = tree.by_id("declared-failing-alert")
    assert alert is not None and squash(alert).startswith("3 declared patterns failing")


def test_hostile_strings_render_as_text(page):
    html, tree, _ = page
    assert html.count("<script") == 1, "only cab's own script element may exist"
    # the only images are cab's own figures, embedded as data URIs (no script runs inside an <img>)
    assert all(img.attrs["src"].startswith("data:image/svg+xml;base64,") for img in tree.find_all("img"))
    assert "<img src=x" not in html and "<b>bold" not in html and "<i>no cross" not in html
    assert HOSTILE in squash(tree.by_id("support-matrix"))
    assert f"configs/{HOSTILE}.yaml" in squash(tree.by_id("runs")) and "onerror=alert(4)" in squash(tree.by_id("runs"))
    assert f"</pre>{HOSTILE}" in squash(tree.by_id("failures"))
    assert '{"w":"<b>bold</b>"}' in squash(tree.by_id("failures"))


def test_status_counts_link_to_the_failures(page):
    _, tree, keys = page
    counts = table_cells(tree.by_id("status-counts"))
    expected = {"ok": 11, "unsupported": 2, "incorrect": 1, "error": 2, "timeout": 1, "oom": 1, "skipped": 1}
    assert {name: int(squash(row["Results"])) for name, row in counts.items()} == expected
    for status in ("incorrect", "error", "timeout", "oom", "skipped"):
        link = counts[status]["Status"].find_all("a")[0].attrs["href"]
        group = tree.by_id(link[1:])
        assert group is not None and "failure-group" in group.classes()
    assert not counts["ok"]["Status"].find_all("a")
    assert counts["unsupported"]["Status"].find_all("a")[0].attrs["href"] == "#support-matrix"


def test_failures_list_every_failed_result_collapsibly(page):
    _, tree, keys = page
    failures = tree.by_id("failures")
    listed = {d.attrs["id"] for d in failures.find_all("details")}
    failed = {f"fail-{r.key}" for r in RESULTS if r.status not in (Status.OK, Status.UNSUPPORTED)}
    assert listed == failed
    oom = tree.by_id(f"fail-{keys[('sdpa', 'bench', 'NS', 256)]}")
    assert squash(oom.find_all("pre")[0]) == "RuntimeError: CPU out of memory"
    leak = tree.by_id(f"fail-{keys[('leaky', 'check', 'CS', 64)]}")
    assert "causality: incorrect" in squash(leak.find_all("ul")[0])


def test_overview_names_runs_devices_and_versions(page):
    _, tree, _ = page
    runs = tree.by_id("runs")
    assert "cab run configs/quick.yaml" in squash(runs) and "finished" in squash(runs)
    environment = squash(tree.by_id("environment"))
    assert "cpu (Test CPU)" in environment and "2.13.0" in environment and "abc123" in environment
    assert "19 results (8 check, 11 bench) for 5 attentions" in squash(tree.by_id("overview"))


# errors and partial stores ---------------------------------------------------------------------------

def test_missing_store_is_a_clear_error_and_is_not_created(tmp_path):
    db = tmp_path / "results" / "cab.sqlite"
    with pytest.raises(ReportError, match=r"no results in .*cab\.sqlite.*run `cab run configs/quick\.yaml` first"):
        render_report(db, tmp_path / "site")
    assert not db.exists() and not (tmp_path / "site").exists()


def test_empty_store_is_a_clear_error(tmp_path):
    db = write_store(tmp_path / "cab.sqlite", [], with_run=False)
    with pytest.raises(ReportError, match=r"^no results in .*cab\.sqlite: run `cab run configs/quick\.yaml` first$"):
        render_report(db, tmp_path / "site")


def test_a_file_that_is_not_a_store_is_a_report_error(tmp_path):
    db = tmp_path / "cab.sqlite"
    db.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ReportError):
        render_report(db, tmp_path / "site")


def test_partial_store_with_odd_rows_still_renders(tmp_path):
    db = write_store(tmp_path / "cab.sqlite", [check("vanilla", "NS", Status.OK)], with_run=False)
    # rows a newer cab or a hand edit might leave: an unknown status, NULL cell fields, metrics of odd types
    odd = "INSERT INTO results (key, kind, attention, pattern, lq, status, hparams, options, metrics, provenance) " \
          "VALUES (?, ?, 'mystery', ?, ?, ?, '{}', '{}', ?, '{}')"
    with sqlite3.connect(db) as conn:
        conn.execute(odd, ("odd1", "bench", "NS", None, "exploded", "{}"))
        conn.execute(odd, ("odd2", "bench", "CS", 64, "ok", '{"median_ms": "fast", "peak_mem_bytes": [1]}'))
        conn.execute(odd, ("odd3", "check", "XX", None, "incorrect", '{"checks": "not a list"}'))
        conn.execute(odd, ("odd4", "check", "CS", None, "error", '{"checks": [1, {"status": "error"}]}'))
    index = render_report(db, tmp_path / "site", fidelity_budget_s=0)
    tree = parse(index.read_text(encoding="utf-8"))
    counts = table_cells(tree.by_id("status-counts"))
    assert squash(counts["exploded"]["Results"]) == "1"
    assert tree.by_id("failures-exploded") is not None and tree.by_id("fail-odd1") is not None
    matrix = table_cells(tree.by_id("support-matrix"))["mystery"]
    assert "unknown" in matrix["CC"].classes()
    assert "failing" in matrix["CS"].classes() and "(unnamed check): error" in matrix["CS"].attrs["title"]
    cs = parse((index.parent / "pattern" / "CS.html").read_text(encoding="utf-8"))
    assert "gated" in table_cells(cs.by_id("eff-CS"))["mystery"]["64×?"].classes()
    assert dict(ranking_rows(tree.by_id("rank-CS")))["mystery"]["Gate"] == "withheld"
    assert "No grid run is recorded" in squash(tree.by_id("overview"))


def test_checks_only_store_renders_without_efficiency_tables(tmp_path):
    db = write_store(tmp_path / "cab.sqlite", [check("vanilla", "NS", Status.OK)])
    tree = parse(render_report(db, tmp_path / "site", fidelity_budget_s=0).read_text(encoding="utf-8"))
    assert "No benchmark results" in squash(tree.by_id("efficiency"))
    assert "No failures" in squash(tree.by_id("failures"))


# aggregation units -------------------------------------------------------------------------------------

def tables(results: "list[Result]", tmp_path: Path) -> Tables:
    with ResultStore(write_store(tmp_path / "cab.sqlite", results, with_run=False)) as store:
        return Tables.from_frames(store.dataframe(), store.runs_dataframe())


def test_declared_support_from_declarations_beats_check_cells(tmp_path):
    two_checks = [{"name": "forward", "status": "ok"}, {"name": "finite", "status": "ok"}]
    results = tables([check("x", "NS", Status.OK, two_checks), check("x", "NS", Status.OK, two_checks, seed=1),
                        check("x", "CS", Status.INCORRECT), check("x", "NC", Status.OK)], tmp_path)
    declared = {"x": Declaration(patterns=frozenset({"NS", "CS"}), reasons={"NC": "no cross"})}
    (row,) = support_matrix(results, declared)
    states = {c.pattern: c.state for c in row.cells}
    assert states == {"NS": "pass", "CS": "failing", "NC": "unsupported", "CC": "unsupported"}
    assert row.cells[2].detail == "no cross" and row.n_declared_failing == 1
    assert (row.cells[0].n_cells, row.cells[0].n_checks) == (2, 4)
    (undeclared,) = support_matrix(results, {})
    assert [c.state for c in undeclared.cells] == ["pass", "failing", "pass", "unknown"]


def test_declarations_read_from_the_conformance_checks_names(tmp_path):
    refused = check("z", "NC", Status.UNSUPPORTED, [{"name": "undeclared_pattern", "status": "unsupported",
                                                    "message": "attention 'z' does not support pattern NC"}],
                    message="attention 'z' does not support pattern NC")
    accepted = check("z", "CC", Status.INCORRECT, [{"name": "undeclared_pattern", "status": "incorrect",
                                                    "message": "undeclared pattern accepted"}])
    unavailable = check("z", "NS", Status.UNSUPPORTED, [{"name": "available", "status": "unsupported",
                                                         "message": "needs CUDA"}], message="needs CUDA")
    results = tables([refused, accepted, unavailable], tmp_path)
    (row,) = support_matrix(results, {})
    ns, cs, nc, cc = row.cells
    assert (ns.state, ns.declared, ns.detail) == ("unavailable", None, "needs CUDA")
    assert cs.state == "unknown"
    assert (nc.state, nc.declared, nc.n_failing) == ("unsupported", False, 0)
    assert nc.detail == "attention 'z' does not support pattern NC"
    # accepting an undeclared pattern is a failed check, but not a declared-but-failing claim
    assert (cc.state, cc.declared, cc.n_failing, cc.verdict) == ("unsupported", False, 1, "incorrect")
    assert cc.detail == "its checks failed: undeclared_pattern: incorrect — undeclared pattern accepted"
    assert row.n_declared_failing == 0


def test_explicit_declared_flag_in_check_metrics_is_used(tmp_path):
    unsupported_here = check("y", "NS", Status.UNSUPPORTED, message="needs CUDA")
    unsupported_here.metrics["declared"] = True
    results = tables([unsupported_here], tmp_path)
    (row,) = support_matrix(results, {})
    assert row.cells[0].state == "unavailable" and row.cells[0].detail == "needs CUDA"


def test_rows_sharing_a_label_are_told_apart_by_hparams_and_seed(tmp_path):
    results = tables([
        bench("local", "NS", 64, metrics=timing(1, 1, 1), hparams={"window": 16}),
        bench("local", "NS", 64, metrics=timing(2, 2, 2), hparams={"window": 32}),
        bench("local", "NS", 64, metrics=timing(3, 3, 3), hparams={"window": 32}, seed=1),
    ], tmp_path)
    (table,) = build_page(results, {}).efficiency
    names = {row.name: row.cells[0].median_ms for row in table.rows}
    assert names == {'local {"window":16} seed=0': 1.0, 'local {"window":32} seed=0': 2.0,
                     'local {"window":32} seed=1': 3.0}


def bench_row(metrics) -> dict:
    """An ok bench result with these stored metrics, as a row of the typed bench table."""
    stored = pd.DataFrame([{"kind": "bench", "mode": "fwd", "status": "ok", "key": "k", "metrics": metrics}])
    return typed_rows(stored).to_dict("records")[0]


def test_a_failed_memory_pass_is_shown_instead_of_a_memory_figure():
    metrics = {**timing(2.0, 1.0, 3.0), "mem_status": "oom", "mem_message": "memory probe killed by SIGKILL"}
    cell = efficiency_cell(bench_row(metrics), gated=False)
    assert (cell.median_ms, cell.mem_mib, cell.mem_status, cell.note) == (2.0, None, "oom",
                                                                          "memory probe killed by SIGKILL")


def test_an_ok_bench_without_metrics_shows_nothing_measured():
    cell = efficiency_cell(bench_row(None), gated=False)
    assert cell.state == "ok" and cell.median_ms is None and cell.mem_mib is None and cell.tflops is None
    nan = efficiency_cell(bench_row({"median_ms": float("nan"), "tflops": True}), gated=False)
    assert nan.median_ms is None and nan.tflops is None


def test_figure_keeps_significant_digits_without_exponents():
    assert [figure(None), figure(1234.5, 3), figure(12.345, 4), figure(0.5), figure(4.0)] == \
        ["—", "1234", "12.35", "0.5", "4"]
