"""Conformance: the checks every attention faces on every pattern it declares, with a status per check
(ok, unsupported, incorrect with the measured error, error with the exception, oom) and a verdict."""

from cab.check.cell_kind import check_cell
from cab.check.conformance import run_conformance, run_probe
from cab.check.gate import gate, published_shape
from cab.check.oracle import eager_attention, oracle_attention
from cab.check.outcomes import CheckOutcome, ConformanceReport
from cab.check.table import verdict_table

__all__ = [
    "CheckOutcome", "ConformanceReport", "check_cell", "eager_attention", "gate", "oracle_attention",
    "published_shape", "run_conformance", "run_probe", "verdict_table",
]
