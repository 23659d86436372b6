"""`verdict_table`: the plain-text verdict table `cab check` prints, one row per (attention, pattern)."""

from __future__ import annotations

from collections import Counter

from cab.check.outcomes import ConformanceReport

MESSAGE_WIDTH = 100  # the message column is cut here (`cab check --json` has the full text)
HEADER = ("attention", "pattern", "status", "check", "error", "tolerance", "message")


def _number(value: "float | None") -> str:
    return "-" if value is None else f"{value:.1e}"


def _shorten(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _row(report: ConformanceReport) -> "tuple[str, ...]":
    check = report.deciding_check
    if check is None:
        return (report.attention, report.pattern.value, report.status.value, "-", "-", "-", report.message)
    return (
        report.attention, report.pattern.value, report.status.value, check.name, _number(check.error),
        _number(check.tolerance), _shorten(check.message, MESSAGE_WIDTH),
    )


def verdict_table(reports: "list[ConformanceReport]") -> str:
    """Aligned columns: attention, pattern, status, the check that decided it, its measured error and
    tolerance, and the message; then a count of verdicts."""
    if not reports:
        return "no conformance reports"
    rows = [HEADER] + [_row(r) for r in reports]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths)) + "  " + row[-1] for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * len(HEADER[-1]))
    counts = Counter(r.status.value for r in reports)
    lines.append("")
    lines.append(f"{len(reports)} verdict(s): " + ", ".join(f"{n} {status}" for status, n in sorted(counts.items())))
    return "\n".join(lines)
