"""The first section of the leaderboard: per pattern, which attentions are fastest and leanest relative to
the fused exact kernel (`sdpa`) and eager exact attention (`vanilla`) at the largest length both were timed
at, with the correctness gate's verdict and coverage on every row and, when task results exist, the
compositional index of the accuracy board.

One ranking per pattern, from that pattern's main efficiency table (forward mode first, then the table with
the most attentions); rows are sorted by the time ratio to sdpa (to vanilla where sdpa has no time), the
attentions without a time at that length last. The main page shows the top of each ranking with both
baselines; the pattern page shows all of it. Pure data in, dataclasses out."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from cab.report.efficiency import EfficiencyCell, EfficiencyTable
from cab.report.support import PATTERNS, SupportRow

BASELINES = ("sdpa", "vanilla")
# the efficiency-length outcomes (cab.report.costs.OUTCOMES) in a ranking cell's few words
SHORT_OUTCOMES = {"cheaper at every measured length": "always", "never cheaper in range": "never",
                  "dearer at the longest length": "not at the end", "no crossing": "no crossing",
                  "too few common lengths": "too few lengths"}
TOP = 10  # attentions besides the baselines on the main page (and in the pattern's plots)
CONTROL = "control"  # the family of negative controls (no_mixing): listed last, unranked (they mix nothing)


@dataclass(frozen=True)
class RankRow:
    name: str  # the row's label as in the efficiency table
    attention: str
    family: str
    baseline: bool
    state: str  # the cell's state at the ranking length: ok, status, gated, missing
    status: str = ""
    rank: "int | None" = None
    median_ms: "float | None" = None
    vs_sdpa: "float | None" = None
    vs_sdpa_spread: "tuple | None" = None  # (p20, p80) / sdpa's median
    vs_vanilla: "float | None" = None
    vs_vanilla_spread: "tuple | None" = None
    mem_mib: "float | None" = None
    mem_vs_sdpa: "float | None" = None
    mem_vs_vanilla: "float | None" = None
    gate: str = ""  # checked, gate off, withheld, failing, or "" (nothing recorded)
    gate_title: str = ""  # what the gate covered, or why the speed is withheld
    length_vs_sdpa: str = ""  # where it overtakes sdpa in time ("" when not computed)
    length_vs_vanilla: str = ""
    index: "float | None" = None  # compositional index of the accuracy board
    link: str = ""  # anchor of a failed result


@dataclass(frozen=True)
class Ranking:
    pattern: str
    id: str
    table_id: str
    title: str
    shape: str
    length: str  # the column (length) the ranking compares at
    key: str  # what the rows are sorted by, in words
    rows: tuple
    has_index: bool = False
    other_tables: int = 0  # further efficiency tables of this pattern (on its page)
    controls: tuple = ()  # negative controls, listed after the ranked rows without a rank

    @property
    def n_timed(self) -> int:
        return sum(r.state == "ok" and not r.baseline for r in self.rows)

    def top(self, n: int = TOP) -> "tuple[RankRow, ...]":
        """The first n attentions besides the baselines and controls, plus the baselines, in ranking order."""
        picked, others = [], 0
        for row in self.rows:
            if row.family == CONTROL:
                continue
            if row.baseline:
                picked.append(row)
            elif others < n:
                picked.append(row)
                others += 1
        return tuple(picked)

    def best_names(self, n: int = TOP) -> "set[str]":
        return {r.name for r in self.top(n)}


def _ratio(value, base) -> "float | None":
    if value is None or base is None or base <= 0:
        return None
    return value / base


def _primary(tables: "list[EfficiencyTable]", pattern: str) -> "tuple[EfficiencyTable | None, int]":
    mine = [t for t in tables if t.pattern == pattern]
    if not mine:
        return None, 0
    best = min(mine, key=lambda t: (t.mode != "fwd", -len(t.rows), mine.index(t)))
    return best, len(mine) - 1


def _baseline_cells(table: EfficiencyTable, name: str) -> "list[EfficiencyCell | None]":
    row = next((r for r in table.rows if r.attention == name and r.name == name), None) or \
        next((r for r in table.rows if r.attention == name), None)
    return list(row.cells) if row else [None] * len(table.columns)


def ranking_column(table: EfficiencyTable) -> int:
    """The largest length at which sdpa (else vanilla, else anyone) has a time."""
    for name in BASELINES:
        cells = _baseline_cells(table, name)
        timed = [i for i, c in enumerate(cells) if c is not None and c.state == "ok" and c.median_ms]
        if timed:
            return timed[-1]
    timed = [i for i in range(len(table.columns)) if any(r.cells[i].state == "ok" for r in table.rows)]
    return timed[-1] if timed else len(table.columns) - 1


def _gate(cell: EfficiencyCell, support: "SupportRow | None", pattern: str) -> "tuple[str, str]":
    if cell.state == "gated":
        return "withheld", cell.note
    conformance = next((c for c in support.cells if c.pattern == pattern), None) if support else None
    if conformance is not None and conformance.state == "failing":
        return "failing", f"declared but failing: {conformance.verdict}"
    if cell.gate == "gate off":
        return "gate off", "timed without the correctness gate"
    if cell.gate:
        return "checked", cell.gate
    if conformance is not None and conformance.state == "pass":
        return "checked", (f"conformance passed ({conformance.n_checks} checks); this result did not record the "
                           f"gate's coverage")
    return "", ""


def _lengths(lengths: pd.DataFrame, table: EfficiencyTable) -> "dict[tuple[str, str], str]":
    """(attention, baseline) -> the time efficiency length with its interval, or its outcome."""
    if lengths is None or lengths.empty:
        return {}
    prefix = " · ".join((table.pattern, table.mode, table.dtype, table.device)) + " · "
    found = {}
    for r in lengths.to_dict("records"):
        if r.get("metric") != "time" or not str(r.get("configuration", "")).startswith(prefix):
            continue
        value = r.get("efficiency_length")
        if value is not None and value == value:
            interval = r.get("interval_95")
            text = f"{int(value):,}" + (f" {interval}" if isinstance(interval, str) and interval else "")
        else:
            outcome = str(r.get("outcome") or "")
            text = next((short for long, short in SHORT_OUTCOMES.items() if outcome.startswith(long)), outcome)
        found.setdefault((str(r["attention"]), str(r["baseline"])), text)
    return found


def _ranking(table: EfficiencyTable, others: int, support: "dict[str, SupportRow]", families: "dict[str, str]",
             lengths: pd.DataFrame, index: "dict[str, float]") -> Ranking:
    col = ranking_column(table)
    base = {}
    for name in BASELINES:
        cell = _baseline_cells(table, name)[col]
        ok = cell is not None and cell.state == "ok"
        base[name] = (cell.median_ms if ok else None, cell.mem_mib if ok else None)
    eff = _lengths(lengths, table)
    rows = []
    for row in table.rows:
        cell = row.cells[col]
        gate, gate_title = _gate(cell, support.get(row.attention), table.pattern)
        common = dict(name=row.name, attention=row.attention, family=families.get(row.attention, ""),
                      baseline=row.attention in BASELINES and row.name == row.attention, state=cell.state,
                      status=cell.status, gate=gate, gate_title=gate_title, link=cell.link,
                      length_vs_sdpa=eff.get((row.attention, "sdpa"), ""),
                      length_vs_vanilla=eff.get((row.attention, "vanilla"), ""), index=index.get(row.name))
        if cell.state != "ok" or cell.median_ms is None:
            rows.append(RankRow(**common))
            continue
        spread = {}
        for name in BASELINES:
            t = base[name][0]
            if t and cell.p20_ms is not None and cell.p80_ms is not None:
                spread[name] = (cell.p20_ms / t, cell.p80_ms / t)
        rows.append(RankRow(
            **common, median_ms=cell.median_ms, mem_mib=cell.mem_mib,
            vs_sdpa=_ratio(cell.median_ms, base["sdpa"][0]), vs_sdpa_spread=spread.get("sdpa"),
            vs_vanilla=_ratio(cell.median_ms, base["vanilla"][0]), vs_vanilla_spread=spread.get("vanilla"),
            mem_vs_sdpa=_ratio(cell.mem_mib, base["sdpa"][1]), mem_vs_vanilla=_ratio(cell.mem_mib, base["vanilla"][1]),
        ))
    if base["sdpa"][0]:
        key, what = (lambda r: r.vs_sdpa), "time ratio to sdpa"
    elif base["vanilla"][0]:
        key, what = (lambda r: r.vs_vanilla), "time ratio to vanilla"
    else:
        key, what = (lambda r: r.median_ms), "median time"
    controls = tuple(sorted((r for r in rows if r.family == CONTROL), key=lambda r: r.name.casefold()))
    rows = [r for r in rows if r.family != CONTROL]
    timed = sorted((r for r in rows if key(r) is not None), key=lambda r: (key(r), r.name.casefold()))
    rest = sorted((r for r in rows if key(r) is None), key=lambda r: r.name.casefold())
    ranked = tuple(RankRow(**{**r.__dict__, "rank": i}) for i, r in enumerate(timed, 1)) + tuple(rest) + controls
    return Ranking(pattern=table.pattern, id=f"rank-{table.pattern}", table_id=table.id, title=table.title,
                   shape=table.shape, length=table.columns[col] if table.columns else "", key=what, rows=ranked,
                   has_index=any(r.index is not None for r in ranked), other_tables=others,
                   controls=tuple(r.name for r in controls))


def rankings(tables: "list[EfficiencyTable]", support: "list[SupportRow]", lengths: "pd.DataFrame | None",
             boards: tuple = ()) -> "list[Ranking]":
    """One ranking per pattern that has bench results, in pattern order."""
    by_name = {row.attention: row for row in support}
    families = {row.attention: row.family for row in support}
    out = []
    for pattern in PATTERNS:
        table, others = _primary(tables, pattern)
        if table is None or not table.rows:
            continue
        board = next((b for b in boards if b.pattern == pattern), None)
        index = {r.label: r.index for r in board.rows if r.index is not None} if board else {}
        out.append(_ranking(table, others, by_name, families, lengths, index))
    return out


def ranking_frame(ranking: Ranking) -> pd.DataFrame:
    """The export of a ranking (None = missing)."""
    records = []
    for r in ranking.rows:
        records.append({
            "rank": r.rank, "attention": r.name, "family": r.family or None, "state": r.status or r.state,
            "median_ms": r.median_ms, "time_vs_sdpa": r.vs_sdpa,
            "time_vs_sdpa_p20": r.vs_sdpa_spread[0] if r.vs_sdpa_spread else None,
            "time_vs_sdpa_p80": r.vs_sdpa_spread[1] if r.vs_sdpa_spread else None,
            "time_vs_vanilla": r.vs_vanilla, "peak_MiB": r.mem_mib, "memory_vs_sdpa": r.mem_vs_sdpa,
            "memory_vs_vanilla": r.mem_vs_vanilla, "gate": r.gate or None, "gate_coverage": r.gate_title or None,
            "efficiency_length_vs_sdpa": r.length_vs_sdpa or None,
            "efficiency_length_vs_vanilla": r.length_vs_vanilla or None, "index": r.index,
        })
    return pd.DataFrame(records)
