"""`verdict_table`: the plain text `cab check` prints: one row per (attention, pattern), then, for each verdict
that is not ok, every check that failed, and what each verdict covers (shapes, dtypes, backends, the
checks that could not run and why)."""

from __future__ import annotations

from collections import Counter

from cab.check.outcomes import CheckOutcome, ConformanceReport
from cab.status import Status

MESSAGE_WIDTH = 100  # the table's message column is cut here (the details below and `--json` have it all)
HEADER = ("attention", "pattern", "status", "check", "error", "tolerance", "message")


def _number(value: "float | None", kind: str = "") -> str:
    if value is None:
        return "-"
    suffix = {"relative": " rel", "relative L2": " relL2", "absolute": " abs", "fraction": " frac"}.get(kind, "")
    return f"{value:.1e}{suffix}"


def _shorten(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _row(report: ConformanceReport) -> "tuple[str, ...]":
    check = report.deciding_check
    if check is None:
        return (report.attention, report.pattern.value, report.status.value, "-", "-", "-", report.message)
    return (
        report.attention, report.pattern.value, report.status.value, check.name, _number(check.error, check.kind),
        _number(check.tolerance), _shorten(check.message, MESSAGE_WIDTH),
    )


def coverage_lines(report: ConformanceReport) -> "list[str]":
    """What the verdict covers, as indented lines (empty when the report has no coverage: unsupported)."""
    covered = report.coverage
    if not covered:
        return []
    ran = [c.name for c in report.checks if c.status is not Status.SKIPPED]
    lines = [f"ran {len(ran)} checks: {', '.join(ran)}"]
    dtypes = covered.get("dtypes") or {}
    if dtypes:
        text = f"dtypes: structural checks in {dtypes.get('structural')}, again in {dtypes.get('requested')}"
        if dtypes.get("structural") == dtypes.get("requested"):
            text = f"dtypes: every check in {dtypes.get('structural')}"
        if covered.get("structural_fallback"):
            text += f" (fallback from float64: {covered['structural_fallback']})"
        lines.append(text)
    if covered.get("backends"):
        lines.append("backends: " + ", ".join(f"{d} -> {b}" for d, b in covered["backends"].items()))
    if covered.get("shapes"):
        lines.append("shapes: " + "; ".join(covered["shapes"]))
    if covered.get("not_run"):
        lines.append("not run: " + "; ".join(f"{name} ({why})" for name, why in covered["not_run"].items()))
    seconds = covered.get("seconds", 0) + covered.get("probe_seconds", 0)
    if seconds:
        lines.append(f"took {seconds:.1f} s")
    return lines


def _failure_lines(check: CheckOutcome) -> str:
    measured = ""
    if check.error is not None:
        measured = f" [{check.kind} error {check.error:.2e}, tolerance {_number(check.tolerance)}]"
    return f"  - {check.name}: {check.status.value}{measured}: {' '.join(check.message.split())}"


def verdict_table(reports: "list[ConformanceReport]", coverage: bool = True) -> str:
    """Aligned columns: attention, pattern, status, the check that decided it, its measured error (labelled
    relative, absolute or a fraction) and tolerance, and the message; a count of verdicts; then each failed
    verdict's failing checks and (with `coverage`) what every verdict covers."""
    if not reports:
        return "no conformance reports"
    rows = [HEADER] + [_row(r) for r in reports]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths)) + "  " + row[-1] for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * len(HEADER[-1]))
    counts = Counter(r.status.value for r in reports)
    lines.append("")
    lines.append(f"{len(reports)} verdict(s): " + ", ".join(f"{n} {status}" for status, n in sorted(counts.items())))
    for report in reports:
        failing = [c for c in report.failing if c.status is not Status.UNSUPPORTED]
        covered = coverage_lines(report) if coverage else []
        if not failing and not covered:
            continue
        lines.append("")
        head = f"{report.attention} {report.pattern.value}: {report.status.value}"
        if failing:
            head += f", {len(failing)} check(s) did not pass of {len(report.checks)}"
        lines.append(head)
        lines += [_failure_lines(c) for c in failing]
        lines += [f"  {line}" for line in covered]
    return "\n".join(lines)
