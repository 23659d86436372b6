"""The "check" cell kind: a conformance verdict of one attention in one pattern."""

from __future__ import annotations

import dataclasses

from cab.budget import over_budget
from cab.cells import Cell, Outcome
from cab.check.conformance import run_conformance
from cab.check.gate import gate_published, published_shape
from cab.kinds import register_cell_kind
from cab.registry import compile_lane, create_attention


@register_cell_kind("check", lane=lambda cell: compile_lane(cell.attention, cell.hparams))
def check_cell(cell: Cell) -> Outcome:
    """Run the conformance suite on the cell's attention, pattern, hparams, device, dtype and seed.

    The suite uses its own small, odd and large shapes; the cell's shape fields do not enter. Seed 0 is the
    correctness gate's own run, so its verdict is shared with the gate (computed once per run), and it also
    probes each shape of option `published` (the grid's bench cells of this configuration: see
    cab.grid.published_by_bench) that their cost budgets do not skip, leaving the probes for those cells."""
    if cell.seed == 0:
        shapes = [published_shape(*(s[k] for k in ("batch", "heads", "kv_heads", "lq", "lk", "head_dim")))
                  for s in cell.options.get("published", []) if not _skipped_by_budget(cell, s)]
        report = gate_published(cell.attention, cell.pattern, cell.hparams, cell.device, cell.dtype, shapes)
    else:
        report = run_conformance(cell.attention, cell.pattern, hparams=cell.hparams, device=cell.device,
                                 dtype=cell.dtype, seed=cell.seed)
    return Outcome(report.status, metrics=report.to_metrics(), message=report.message)


def _skipped_by_budget(cell: Cell, shape: dict) -> bool:
    """Whether the bench cell publishing `shape` will be skipped by its cost budgets (cab.budget), so
    that nothing is published there to probe; an attention that does not build is left to the suite."""
    bench = dataclasses.replace(
        cell, kind="bench", mode=shape["mode"], batch=shape["batch"], heads=shape["heads"],
        kv_heads=shape["kv_heads"], lq=shape["lq"], lk=shape["lk"], head_dim=shape["head_dim"],
        options={k: shape[k] for k in ("max_memory_bytes", "max_flops") if k in shape})
    try:
        attn = create_attention(cell.attention, cell.pattern, shape["heads"], shape["head_dim"], **cell.hparams)
    except Exception:
        return False
    return over_budget(attn, bench) is not None

