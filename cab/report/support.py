"""The pattern support matrix: what each attention declares per pattern against its conformance verdicts.

"Declared but failing" (a pattern the attention claims, whose checks fail) is the finding the matrix
exists to show. Declarations come from the registry when the attention is registered in this process,
otherwise from its check cells (a check cell of an undeclared pattern ends `unsupported`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

import pandas as pd

from cab import registry
from cab.patterns import Pattern
from cab.report.fields import STATUS_ORDER, anchor, number, status, text
from cab.status import Status
from cab.tables import Tables

PATTERNS = tuple(p.value for p in Pattern)
NEUTRAL = frozenset({Status.OK.value, Status.SKIPPED.value, Status.UNSUPPORTED.value})
# names of the conformance checks (cab.check) that the matrix reads declarations from
UNDECLARED_CHECK = "undeclared_pattern"
AVAILABLE_CHECK = "available"


@dataclass(frozen=True)
class Declaration:
    """The patterns an attention declares, why the others are unsupported, and its citation."""

    patterns: frozenset
    reasons: dict = field(default_factory=dict)
    family: str = ""
    citation: str = ""
    version: "int | None" = None


@dataclass(frozen=True)
class SupportCell:
    """One attention x pattern: declared support, the worst check status and what failed.

    state is one of: pass, failing (declared but failing), unchecked, skipped, unavailable (declared,
    but its checks say it cannot run here), unsupported (not declared), unknown (nothing says)."""

    pattern: str
    state: str
    declared: "bool | None"
    verdict: str = ""
    detail: str = ""
    n_cells: int = 0  # check cells (configurations) run for this attention and pattern
    n_checks: int = 0  # individual checks listed by those cells (a cell listing none counts as one)
    n_failing: int = 0
    links: tuple = ()


@dataclass(frozen=True)
class SupportRow:
    attention: str
    family: str
    citation: str
    source: str  # where the declarations come from: "registry", "check results" or ""
    cells: tuple
    version: str = ""  # the attention versions its results measured ("v1"), and the registered one if other

    @property
    def n_declared_failing(self) -> int:
        return sum(c.state == "failing" for c in self.cells)


def registry_declarations(names: Iterable[str]) -> "dict[str, Declaration]":
    """Declarations of those of `names` that are registered in this process (built-ins, loaded plugins)."""
    registered = set(registry.names())
    declarations = {}
    for name in names:
        if name in registered:
            spec = registry.get_spec(name)
            declarations[name] = Declaration(
                patterns=frozenset(p.value for p in spec.patterns),
                reasons={p.value: r for p, r in spec.unsupported_reasons.items()},
                family=spec.family, citation=spec.citation, version=spec.version,
            )
    return declarations


def failing_checks(checks: "list | None") -> "list[str]":
    """'name: status (error E > tolerance T)' for each failing check a check result lists (its `checks`)."""
    if not isinstance(checks, list):
        return []
    found = []
    for check in checks:
        if not isinstance(check, Mapping) or status(check.get("status")) in NEUTRAL:
            continue
        line = f"{text(check.get('name')) or '(unnamed check)'}: {status(check.get('status'))}"
        error, tolerance = number(check.get("error")), number(check.get("tolerance"))
        if error is not None:
            line += f" (error {error:.3g}" + (f" > tolerance {tolerance:.3g})" if tolerance is not None else ")")
        message = text(check.get("message")).strip().splitlines()
        if message:
            line += f" — {message[0]}"
        found.append(line)
    return found


def _is_failing(value: str) -> bool:
    """Failing statuses (incorrect, error, timeout, oom), and any status this cab does not know."""
    return value not in NEUTRAL


def _status_line(value: object, message: object) -> str:
    """'status: first line of the message' (just the status when there is no message)."""
    lines = text(message).strip().splitlines()
    return f"{status(value)}: {lines[0]}" if lines else status(value)


def _worst(values: "list[str]") -> str:
    """The most severe status (a status this cab does not know counts as the worst)."""
    unknown = [v for v in values if v not in STATUS_ORDER]
    return unknown[0] if unknown else Status.worst([Status(v) for v in values]).value


def _check_names(checks: "list | None") -> "set[str]":
    return {text(c.get("name")) for c in checks if isinstance(c, Mapping)} if isinstance(checks, list) else set()


def _declared_by_checks(cells: pd.DataFrame) -> "bool | None":
    """Declared support read from check cells: an explicit `declared`; else an `undeclared_pattern` check
    means undeclared; else any cell that ran means declared. A cell that only found the attention
    unavailable on its device (check `available`, status unsupported) says nothing either way."""
    flags = [flag for flag in cells["declared"] if isinstance(flag, bool)]
    if flags:
        return any(flags)
    informative = False
    for value, checks in zip(cells["status"], cells["checks"]):
        names = _check_names(checks)
        if UNDECLARED_CHECK in names:
            return False
        if status(value) == Status.UNSUPPORTED.value and AVAILABLE_CHECK in names:
            continue
        informative = True
        if status(value) != Status.UNSUPPORTED.value:
            return True
    return False if informative else None


def _first_message(cells: pd.DataFrame, wanted: str) -> str:
    for value, message in zip(cells["status"], cells["message"]):
        if status(value) == wanted and text(message).strip():
            return text(message).strip().splitlines()[0]
    return ""


def _cell(pattern: str, declared: "bool | None", reason: str, cells: pd.DataFrame) -> SupportCell:
    statuses = [status(s) for s in cells["status"]]
    failing = cells.loc[pd.Series([_is_failing(s) for s in statuses], index=cells.index, dtype=bool)]
    problems = []
    for _, row in failing.iterrows():
        problems += failing_checks(row["checks"]) or [_status_line(row["status"], row["message"])]
    detail = "; ".join(dict.fromkeys(problems))
    common = dict(
        pattern=pattern, declared=declared, verdict=_worst(statuses) if statuses else "", n_cells=len(statuses),
        n_checks=sum(max(len(_check_names(checks)), 1) for checks in cells["checks"]),
        n_failing=len(failing), links=tuple(anchor(k) for k in failing["key"]),
    )
    if declared is False:
        reason = reason or _first_message(cells, Status.UNSUPPORTED.value)
        note = f"its checks failed: {detail}" if detail else ""
        return SupportCell(state="unsupported", detail="; ".join(p for p in (reason, note) if p), **common)
    if declared is None:
        if statuses:  # only cells that found the attention unavailable on their device
            return SupportCell(state="unavailable", detail=_first_message(cells, Status.UNSUPPORTED.value), **common)
        return SupportCell(state="unknown", **common)
    if len(failing):
        return SupportCell(state="failing", detail=detail, **common)
    if not statuses:
        return SupportCell(state="unchecked", **common)
    if Status.OK.value in statuses:
        return SupportCell(state="pass", **common)
    if Status.UNSUPPORTED.value in statuses:
        return SupportCell(state="unavailable", detail=_first_message(cells, Status.UNSUPPORTED.value), **common)
    return SupportCell(state="skipped", detail=_first_message(cells, Status.SKIPPED.value), **common)


def support_matrix(tables: Tables, declarations: "Mapping[str, Declaration]") -> "list[SupportRow]":
    """One row per attention found in the results, one cell per pattern (NS, CS, NC, CC), from the check
    table."""
    results, checks = tables.results, tables.check
    names = sorted({text(a) for a in results["attention"]}, key=str.casefold)
    rows = []
    for name in names:
        mine = checks[checks["attention"].map(text) == name]
        declaration = declarations.get(name)
        cells = []
        for pattern in PATTERNS:
            per_pattern = mine[mine["pattern"].map(text) == pattern]
            if declaration is not None:
                declared = pattern in declaration.patterns
                reason = declaration.reasons.get(pattern, "")
            else:
                declared, reason = _declared_by_checks(per_pattern), ""
            cells.append(_cell(pattern, declared, reason, per_pattern))
        source = "registry" if declaration is not None else ("check results" if len(mine) else "")
        rows.append(SupportRow(
            attention=name, family=declaration.family if declaration else "",
            citation=declaration.citation if declaration else "", source=source, cells=tuple(cells),
            version=_versions(results[results["attention"].map(text) == name], declaration),
        ))
    return rows


def _versions(results: pd.DataFrame, declaration: "Declaration | None") -> str:
    """'v1' for the attention versions an attention's results measured; results from before versions were
    recorded count as 'unversioned'; ', registered v2' when the registered version is another (stale)."""
    column = results["versions"] if "versions" in results else pd.Series([None] * len(results), dtype=object)
    seen = sorted({v.get("attention") if isinstance(v, dict) and v.get("attention") else 0 for v in column})
    words = [f"v{v}" if v else "unversioned" for v in seen]
    registered = declaration.version if declaration is not None else None
    if registered is not None and seen != [registered]:
        words.append(f"registered v{registered}")
    return ", ".join(words)
