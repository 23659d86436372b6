"""Plain-text table of bench results, as `cab bench` prints it."""

from __future__ import annotations

from cab.cells import Result
from cab.coverage import coverage_summary
from cab.status import Status

HEADERS = ("attention", "pattern", "mode", "L", "median ms [p20-p80]", "cv", "peak MiB", "TFLOP/s", "status", "gate")
_MIB = 1024 * 1024


def _length(result: Result) -> str:
    cell = result.cell
    return str(cell.lq) if cell.lq == cell.lk else f"{cell.lq}x{cell.lk}"


def _timing(metrics: dict) -> str:
    if metrics.get("median_ms") is None:
        return "-"
    return f"{metrics['median_ms']:.3f} [{metrics['p20_ms']:.3f}-{metrics['p80_ms']:.3f}]"


def _cv(metrics: dict) -> str:
    if metrics.get("cv") is None:
        return "-"
    return f"{100 * metrics['cv']:.1f}%" + (" !" if metrics.get("high_cv") else "")


def _memory(metrics: dict) -> str:
    if metrics.get("mem_status", "ok") != "ok":
        return str(metrics["mem_status"])
    if metrics.get("peak_mem_bytes") is None:
        return "-"
    bound = "<=" if metrics.get("mem_upper_bound") else ""
    return f"{bound}{metrics['peak_mem_bytes'] / _MIB:.1f}"


def _throughput(metrics: dict) -> str:
    return "-" if metrics.get("tflops") is None else f"{metrics['tflops']:.4f}"


def _status(result: Result) -> str:
    if result.status is Status.OK:
        return "ok"
    first_line = result.message.strip().splitlines()[0] if result.message.strip() else ""
    if len(first_line) > 80:
        first_line = first_line[:77] + "..."
    return f"{result.status.value}: {first_line}" if first_line else result.status.value


def _gate(metrics: dict) -> str:
    gate = metrics.get("gate")
    if gate is None:
        return "-"
    summary = coverage_summary(metrics.get("gate_coverage"))
    return f"{gate}: {summary}" if summary else str(gate)


def bench_table(results: "list[Result]") -> str:
    """One row per result: attention, pattern, mode, length, median time with p20-p80, CV (flagged with
    "!" above 5%), peak memory in MiB ("<=" when an upper bound), effective TFLOP/s, status or message, and
    what the correctness gate that let the timing through covered."""
    rows = [
        (r.cell.display_name, str(r.cell.pattern), r.cell.mode, _length(r), _timing(r.metrics), _cv(r.metrics),
         _memory(r.metrics), _throughput(r.metrics), _status(r), _gate(r.metrics))
        for r in results
    ]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(HEADERS)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(HEADERS, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)
