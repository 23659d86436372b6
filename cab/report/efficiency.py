"""Efficiency tables: one per pattern, mode, dtype, device and shape; rows are attentions, columns lengths.

A cell shows the median time with its p20-p80 spread, peak memory and effective TFLOP/s. A cell with no
result is missing (never 0), a failed one shows its status, and an attention whose conformance checks
fail for the pattern has its speed withheld ("correctness before speed").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import pandas as pd

from cab.cells import BENCH_MODES
from cab.coverage import coverage_summary
from cab.report.fields import anchor, compact_json, integer, label, mapping, shape, slug, status, text
from cab.report.support import PATTERNS
from cab.status import Status

GROUP_FIELDS = ("pattern", "mode", "dtype", "device", "batch", "heads", "kv_heads", "head_dim")
MIB = 2 ** 20


@dataclass(frozen=True)
class EfficiencyCell:
    """state: ok (numbers), missing (no result), status (a non-ok result), gated (speed withheld)."""

    state: str
    status: str = ""
    median_ms: "float | None" = None
    p20_ms: "float | None" = None
    p80_ms: "float | None" = None
    mem_mib: "float | None" = None
    mem_status: str = ""  # why there is no memory figure (the memory pass's oom, timeout or error)
    tflops: "float | None" = None
    cv: "float | None" = None
    high_cv: bool = False
    note: str = ""
    link: str = ""
    gate: str = ""  # what the correctness gate that let this timing through covered

    @property
    def sort_value(self) -> "float | None":
        return self.median_ms if self.state == "ok" else None


@dataclass(frozen=True)
class EfficiencyRow:
    name: str
    cells: tuple
    attention: str = ""


@dataclass(frozen=True)
class EfficiencyTable:
    id: str
    pattern: str
    mode: str
    dtype: str
    device: str
    shape: str  # batch, heads and head dim, e.g. "B=1 H=8 (KV 2) D=64"
    columns: tuple
    rows: tuple

    @property
    def title(self) -> str:
        return " · ".join(part for part in (self.pattern, self.mode, self.dtype, self.device) if part)


def _order(value: str, known: "tuple[str, ...]") -> int:
    return known.index(value) if value in known else len(known)


def _group_sort_key(key: dict) -> tuple:
    return (
        _order(key["pattern"], PATTERNS), _order(key["mode"], BENCH_MODES), key["dtype"], key["device"],
        *(integer(key[f]) or 0 for f in ("batch", "heads", "kv_heads", "head_dim")),
    )


def _shape_text(key: dict) -> str:
    """'B=1 H=8 (KV 2) D=64', '?' for a size the store does not have."""
    batch, heads, kv, dim = ("?" if v is None else v for v in
                             (integer(key[f]) for f in ("batch", "heads", "kv_heads", "head_dim")))
    kv_text = f" (KV {kv})" if kv != heads else ""
    return f"B={batch} H={heads}{kv_text} D={dim}"


def _table_id(key: dict, taken: "set[str]") -> str:
    """A stable, unique id such as eff-NS-fwd-float32-cpu-b1-h4-kv4-d64 (missing fields left out)."""
    sizes = [f"{prefix}{integer(key[f])}" for prefix, f in
             (("b", "batch"), ("h", "heads"), ("kv", "kv_heads"), ("d", "head_dim")) if integer(key[f]) is not None]
    parts = [key["pattern"], key["mode"], key["dtype"], key["device"], *sizes]
    base = "eff-" + slug("-".join(p for p in parts if p))
    table_id, n = base, 1
    while table_id in taken:
        n += 1
        table_id = f"{base}-{n}"
    taken.add(table_id)
    return table_id


def _tflops(row: Mapping, median_ms: "float | None") -> "float | None":
    tflops, flops = row.get("tflops"), row.get("flops")
    if tflops is None and flops is not None and median_ms:
        tflops = flops / (median_ms * 1e-3) / 1e12
    return tflops


def efficiency_cell(row: Mapping, gated: bool) -> EfficiencyCell:
    """What one bench result (a row of the typed bench table) shows in its table cell."""
    value = status(row.get("status"))
    message = (text(row.get("message")).strip().splitlines() or [""])[0]
    if value != Status.OK.value:
        link = "" if value == Status.UNSUPPORTED.value else anchor(row.get("key"))
        return EfficiencyCell(state="status", status=value, note=message, link=link)
    if gated:
        return EfficiencyCell(state="gated", status=value,
                              note="speed withheld: this attention fails its conformance checks for this pattern")
    median, peak, mem_status = row.get("median_ms"), row.get("peak_mem_bytes"), row.get("mem_status") or ""
    mem_failed = peak is None and mem_status not in ("", Status.OK.value)
    return EfficiencyCell(
        state="ok", status=value, median_ms=median, p20_ms=row.get("p20_ms"), p80_ms=row.get("p80_ms"),
        mem_mib=None if peak is None else peak / MIB, mem_status=mem_status if mem_failed else "",
        note=(row.get("mem_message") or "") if mem_failed else "", tflops=_tflops(row, median), cv=row.get("cv"),
        high_cv=row.get("high_cv") is True, gate=_gate_text(row),
    )


def _gate_text(row: Mapping) -> str:
    """"gate ok: <coverage>", "gate off", or "" for rows stored before the gate recorded its coverage."""
    gate = row.get("gate")
    if not gate:
        return ""
    summary = coverage_summary(row.get("gate_coverage"))
    return f"gate {gate}: {summary}" if summary else f"gate {gate}"


def _row_names(identities: "list[tuple]") -> "dict[tuple, str]":
    """Display names: the label, plus whatever tells apart rows sharing it (attention, hparams, seed)."""
    by_label: dict[str, list[tuple]] = {}
    for identity in identities:
        by_label.setdefault(identity[0], []).append(identity)
    names = {}
    for name, group in by_label.items():
        for identity in group:
            extra = [
                part for position, part in ((1, identity[1]), (2, identity[2]), (3, f"seed={identity[3]}"))
                if len({g[position] for g in group}) > 1 and part
            ]
            names[identity] = " ".join([name, *extra])
    return names


def _column(row: Mapping) -> tuple:
    return (integer(row.get("lq")), integer(row.get("lk")))


def _column_order(column: tuple) -> tuple:
    return tuple(-1 if length is None else length for length in column)


def _table(fields: dict, rows: "list[dict]", gated: "set[tuple[str, str]]", table_id: str) -> EfficiencyTable:
    """One table: a row per (label, attention, hparams, seed), a column per (Lq, Lk)."""
    columns = sorted({_column(r) for r in rows}, key=_column_order)
    grid: dict[tuple, dict[tuple, EfficiencyCell]] = {}
    for r in rows:
        attention = text(r.get("attention"))
        identity = (label(r), attention, compact_json(mapping(r.get("hparams"))), integer(r.get("seed")))
        grid.setdefault(identity, {})[_column(r)] = efficiency_cell(r, (attention, fields["pattern"]) in gated)
    names = _row_names(list(grid))
    table_rows = sorted(
        (EfficiencyRow(names[i], tuple(cells.get(c, EfficiencyCell(state="missing")) for c in columns), i[1])
         for i, cells in grid.items()),
        key=lambda row: row.name.casefold(),
    )
    return EfficiencyTable(
        id=table_id, pattern=fields["pattern"], mode=fields["mode"], dtype=fields["dtype"], device=fields["device"],
        shape=_shape_text(fields), columns=tuple(shape({"lq": lq, "lk": lk}) for lq, lk in columns),
        rows=tuple(table_rows),
    )


def efficiency_tables(bench: pd.DataFrame, gated: "set[tuple[str, str]]") -> "list[EfficiencyTable]":
    """Tables of the bench results (the typed bench table, cab.tables); `gated` holds the (attention,
    pattern) pairs whose checks fail."""
    groups: dict[tuple, list[dict]] = {}
    for row in bench.to_dict("records"):
        key = tuple(text(row.get(f)) if f in ("pattern", "mode", "dtype", "device") else integer(row.get(f))
                    for f in GROUP_FIELDS)
        groups.setdefault(key, []).append(row)
    tables, taken = [], set()
    for key in sorted(groups, key=lambda k: _group_sort_key(dict(zip(GROUP_FIELDS, k)))):
        fields = dict(zip(GROUP_FIELDS, key))
        tables.append(_table(fields, groups[key], gated, _table_id(fields, taken)))
    return tables
