"""Builds the page model of the leaderboard from the store's typed tables (cab.tables, read once): overview,
support matrix, efficiency tables and the failures list; each section takes the table it needs. Pure pandas
and dataclasses: rendering lives in html.py."""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass, field
from typing import Mapping

import pandas as pd

from cab.report.costs import Costs, costs
from cab.report.efficiency import EfficiencyTable, efficiency_tables
from cab.report.fidelity import Fidelity, fidelity
from cab.report.fields import (
    STATUS_ORDER,
    anchor,
    compact_json,
    integer,
    label,
    mapping,
    shape,
    slug,
    status,
    text,
)
from cab.report.leaderboard import Accuracy, accuracy
from cab.report.pages import attention_pages, page_file
from cab.report.rankings import Ranking, ranking_frame, rankings
from cab.report.support import PATTERNS, Declaration, SupportRow, failing_checks, support_matrix
from cab.status import Status
from cab.tables import Tables

NOT_FAILURES = frozenset({Status.OK.value, Status.UNSUPPORTED.value})
# provenance keys shown in the overview, with their display names
VERSION_KEYS = (("cab_version", "cab"), ("git_sha", "git SHA"), ("python", "Python"), ("torch", "torch"),
                ("triton", "triton"), ("cuda", "CUDA"), ("threads", "CPU threads"))


@dataclass(frozen=True)
class StatusCount:
    status: str
    count: int
    target: str  # id of the element that lists these results ('' when none does)


@dataclass(frozen=True)
class Run:
    run_id: str
    config: str
    command: str
    started_at: str
    finished_at: str
    cells_planned: str
    cells_run: str
    state: str


@dataclass(frozen=True)
class Overview:
    generated_at: str
    n_results: int
    n_check: int
    n_bench: int
    n_attentions: int
    first_started: str
    last_finished: str
    status_counts: tuple
    runs: tuple
    devices: tuple
    versions: tuple  # (name, "value, value") pairs
    declared_failing: int
    n_task: int = 0


@dataclass(frozen=True)
class Failure:
    id: str
    status: str
    name: str
    kind: str
    pattern: str
    mode: str
    shape: str
    dtype: str
    device: str
    hparams: str
    message: str
    checks: tuple


@dataclass(frozen=True)
class FailureGroup:
    status: str
    id: str
    items: tuple


@dataclass(frozen=True)
class Page:
    overview: Overview
    support: "list[SupportRow]"
    efficiency: "list[EfficiencyTable]"
    failures: "list[FailureGroup]"
    accuracy: "Accuracy | None" = None
    costs: "Costs | None" = None
    fidelity: "Fidelity | None" = None
    catalog: tuple = ()
    pages: tuple = ()
    links: dict = field(default_factory=dict)  # attention name or row label -> its page file
    exports: tuple = ()  # (id, title, DataFrame) written as CSV and Markdown
    rankings: "tuple[Ranking, ...]" = ()

    def link(self, name: str) -> str:
        return self.links.get(name, "")

    def tables_of(self, pattern: str) -> "list[EfficiencyTable]":
        return [t for t in self.efficiency if t.pattern == pattern]

    def ranking_of(self, pattern: str) -> "Ranking | None":
        return next((r for r in self.rankings if r.pattern == pattern), None)

    @property
    def patterns_with_results(self) -> "list[str]":
        """Patterns with an efficiency table or a task board (each has its page)."""
        boards = {b.pattern for b in self.accuracy.boards} if self.accuracy else set()
        return [p for p in PATTERNS if self.tables_of(p) or p in boards]


def _distinct(values) -> "list[str]":
    return list(dict.fromkeys(v for v in (text(x) for x in values) if v))


def _run_provenance(runs: pd.DataFrame) -> "list[dict]":
    if "provenance" not in runs:
        return []
    parsed = []
    for value in runs["provenance"]:
        try:
            parsed.append(mapping(json.loads(value) if isinstance(value, str) else value))
        except json.JSONDecodeError:
            continue
    return parsed


def _status_target(value: str, count: int) -> str:
    if not count or value == Status.OK.value:
        return ""
    return "support-matrix" if value == Status.UNSUPPORTED.value else f"failures-{slug(value)}"


def status_counts(results: pd.DataFrame) -> "tuple[StatusCount, ...]":
    """Every status with its count (zeros included), statuses this cab does not know appended."""
    counts = results["status"].map(status).value_counts()
    names = list(STATUS_ORDER) + sorted(set(counts.index) - set(STATUS_ORDER))
    return tuple(StatusCount(s, int(counts.get(s, 0)), _status_target(s, int(counts.get(s, 0)))) for s in names)


def _runs(runs: pd.DataFrame) -> "tuple[Run, ...]":
    return tuple(
        Run(run_id=text(r.get("run_id")), config=text(r.get("config")), command=text(r.get("command")),
            started_at=text(r.get("started_at")), finished_at=text(r.get("finished_at")),
            cells_planned=text(integer(r.get("cells_planned"))), cells_run=text(integer(r.get("cells_run"))),
            state=text(r.get("state")))
        for r in runs.to_dict("records")
    )


def overview(tables: Tables, support: "list[SupportRow]") -> Overview:
    """What was run, where, with which versions, and how it ended."""
    results, runs = tables.results, tables.runs
    provenance = [mapping(p) for p in results["provenance"]] + _run_provenance(runs)
    devices = _distinct(
        f"{text(p.get('device'))} ({text(p.get('device_name'))})" if text(p.get("device_name")) else p.get("device")
        for p in provenance
    ) or _distinct(results["device"])
    versions = tuple((name, ", ".join(_distinct(p.get(key) for p in provenance))) for key, name in VERSION_KEYS)
    kinds = results["kind"].map(text)
    return Overview(
        generated_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        n_results=len(results), n_check=int((kinds == "check").sum()), n_bench=int((kinds == "bench").sum()),
        n_attentions=len(_distinct(results["attention"])),
        first_started=min(_distinct(results["started_at"]), default=""),
        last_finished=max(_distinct(results["finished_at"]), default=""),
        status_counts=status_counts(results), runs=_runs(runs), devices=tuple(devices),
        versions=tuple(v for v in versions if v[1]),
        declared_failing=sum(row.n_declared_failing for row in support), n_task=int((kinds == "task").sum()),
    )


def _failure(row: Mapping) -> Failure:
    return Failure(
        id=anchor(row.get("key")), status=status(row.get("status")), name=label(row),
        kind=text(row.get("kind")), pattern=text(row.get("pattern")), mode=text(row.get("mode")), shape=shape(row),
        dtype=text(row.get("dtype")), device=text(row.get("device")),
        hparams=compact_json(mapping(row.get("hparams"))), message=text(row.get("message")),
        checks=tuple(failing_checks(row.get("checks"))),
    )


def failures(results: pd.DataFrame) -> "list[FailureGroup]":
    """Every result that is neither ok nor unsupported, grouped by status (in the Status enum's order)."""
    failed = [r for r in results.to_dict("records") if status(r.get("status")) not in NOT_FAILURES]
    items = sorted(map(_failure, failed), key=lambda f: (f.name.casefold(), f.pattern, f.kind, f.mode, f.shape))
    order = list(STATUS_ORDER) + sorted({f.status for f in items} - set(STATUS_ORDER))
    return [
        FailureGroup(status=s, id=f"failures-{slug(s)}", items=tuple(f for f in items if f.status == s))
        for s in order if any(f.status == s for f in items)
    ]


def _catalog() -> tuple:
    from cab.catalog import catalog_rows

    try:
        return tuple(catalog_rows())
    except Exception:  # a broken plugin registry must not break the report
        return ()


def _frames(page: Page) -> "list[tuple[str, str, pd.DataFrame]]":
    """Exports of the tables the templates build from the page model (the others carry their frames)."""
    frames = [("status-counts", "Results by status",
               pd.DataFrame([{"status": c.status, "results": c.count} for c in page.overview.status_counts])),
              ("support-matrix", "Pattern support: declared support and conformance verdict", pd.DataFrame([
                  {"attention": row.attention, "family": row.family or None,
                   **{c.pattern: c.state + (f" ({c.verdict})" if c.verdict and c.state == "failing" else "")
                      for c in row.cells},
                   "declared_by": row.source or None, "citation": row.citation or None}
                  for row in page.support]))]
    for t in page.efficiency:
        records = []
        for row in t.rows:
            record = {"attention": row.name}
            for column, cell in zip(t.columns, row.cells):
                ok = cell.state == "ok"
                record[f"L={column} median_ms"] = cell.median_ms if ok else None
                record[f"L={column} p20_ms"] = cell.p20_ms if ok else None
                record[f"L={column} p80_ms"] = cell.p80_ms if ok else None
                record[f"L={column} peak_MiB"] = cell.mem_mib if ok else None
                record[f"L={column} TFLOP/s"] = cell.tflops if ok else None
                record[f"L={column} status"] = {"ok": "ok", "missing": None, "gated": "withheld"}.get(
                    cell.state, cell.status)
            records.append(record)
        frames.append((t.id, f"Efficiency {t.title} ({t.shape})", pd.DataFrame(records)))
    frames.append(("failures", "Failed results", pd.DataFrame(
        [{"status": f.status, "attention": f.name, "kind": f.kind, "pattern": f.pattern, "mode": f.mode or None,
          "length": f.shape, "dtype": f.dtype, "device": f.device, "hparams": f.hparams or None,
          "message": (f.message.strip().splitlines() or [""])[0] or None}
         for g in page.failures for f in g.items],
        columns=["status", "attention", "kind", "pattern", "mode", "length", "dtype", "device", "hparams", "message"])))
    frames.append(("catalog", "Seed-mechanism coverage", pd.DataFrame(
        [r.to_dict() | {"attentions": ", ".join(r.attentions), "patterns": " ".join(r.patterns)}
         for r in page.catalog])))
    return frames


def build_page(tables: Tables, declarations: "Mapping[str, Declaration]", fidelity_budget_s: float = 0.0) -> Page:
    """The whole leaderboard model from the store's typed tables (cab.report.load.read_tables). `fidelity_budget_s`
    > 0 runs the fidelity measurements (cab.report.fidelity) for at most that long."""
    from cab import registry

    results = tables.results
    support = support_matrix(tables, declarations)
    gated = {(row.attention, cell.pattern) for row in support for cell in row.cells if cell.n_failing}
    efficiency = efficiency_tables(tables.bench, gated)
    try:
        acc = accuracy(tables, gated)
    except Exception as exc:  # task rows this cab cannot read must not break the rest of the report
        acc = Accuracy((), (), (), None, (), None, "", (), len(tables.task), error=f"{type(exc).__name__}: {exc}")
    cost = costs(tables.bench, efficiency, gated)
    registered = set(registry.names())
    pairs = [(row.attention, cell.pattern) for row in support for cell in row.cells
             if cell.state == "pass" and row.attention in registered]
    fid = fidelity(pairs, fidelity_budget_s) if fidelity_budget_s > 0 and pairs else None
    summary = next((frame for i, _, frame in acc.exports if i == "task-summary"), None)
    pages = attention_pages(results, support, summary, cost.lengths, cost.exponents)
    links = {p.name: p.file for p in pages}
    for row in results.to_dict("records"):
        links.setdefault(label(row), page_file(text(row.get("attention"))))
    ranks = rankings(efficiency, support, cost.lengths, acc.boards)
    page = Page(
        overview=overview(tables, support), support=support, efficiency=efficiency,
        failures=failures(results), accuracy=acc, costs=cost, fidelity=fid, catalog=_catalog(),
        pages=tuple(pages), links=links, rankings=tuple(ranks),
    )
    exports = [(r.id, f"{r.pattern} ranking ({r.title}, {r.shape}) at L={r.length}", ranking_frame(r))
               for r in ranks]
    exports += _frames(page) + list(acc.exports) + list(cost.exports)
    if fid is not None:
        exports.append(("fidelity", "Fidelity: approximation error and numeric deviation", fid.frame))
    return Page(**{**page.__dict__, "exports": tuple(exports)})
