"""Builds the page model of the leaderboard from the store's frames: overview, support matrix,
efficiency tables and the failures list. Pure pandas and dataclasses: rendering lives in html.py."""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass
from typing import Mapping

import pandas as pd

from cab.report.efficiency import EfficiencyTable, efficiency_tables
from cab.report.fields import (
    STATUS_ORDER, anchor, compact_json, integer, label, mapping, shape, slug, status, text,
)
from cab.report.support import Declaration, SupportRow, failing_checks, support_matrix
from cab.status import Status

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


def overview(results: pd.DataFrame, runs: pd.DataFrame, support: "list[SupportRow]") -> Overview:
    """What was run, where, with which versions, and how it ended."""
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
        declared_failing=sum(row.n_declared_failing for row in support),
    )


def _failure(row: Mapping) -> Failure:
    return Failure(
        id=anchor(row.get("key")), status=status(row.get("status")), name=label(row),
        kind=text(row.get("kind")), pattern=text(row.get("pattern")), mode=text(row.get("mode")), shape=shape(row),
        dtype=text(row.get("dtype")), device=text(row.get("device")),
        hparams=compact_json(mapping(row.get("hparams"))), message=text(row.get("message")),
        checks=tuple(failing_checks(mapping(row.get("metrics")))),
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


def build_page(results: pd.DataFrame, runs: pd.DataFrame, declarations: "Mapping[str, Declaration]") -> Page:
    """The whole leaderboard model from the results and runs frames."""
    support = support_matrix(results, declarations)
    gated = {(row.attention, cell.pattern) for row in support for cell in row.cells if cell.n_failing}
    return Page(
        overview=overview(results, runs, support), support=support,
        efficiency=efficiency_tables(results, gated), failures=failures(results),
    )
