"""The "check" cell kind: a conformance verdict of one attention in one pattern."""

from __future__ import annotations

from cab.cells import Cell, Outcome
from cab.check.conformance import run_conformance
from cab.check.gate import gate
from cab.kinds import register_cell_kind


@register_cell_kind("check")
def check_cell(cell: Cell) -> Outcome:
    """Run the conformance suite on the cell's attention, pattern, hparams, device, dtype and seed.

    The suite uses its own small and odd shapes; the cell's shape fields do not enter. Seed 0 is the
    correctness gate's own run, so its verdict is shared with the gate (computed once per run)."""
    if cell.seed == 0:
        report = gate(cell.attention, cell.pattern, cell.hparams, cell.device, cell.dtype)
    else:
        report = run_conformance(cell.attention, cell.pattern, hparams=cell.hparams, device=cell.device,
                                 dtype=cell.dtype, seed=cell.seed)
    return Outcome(report.status, metrics=report.to_metrics(), message=report.message)
