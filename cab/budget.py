"""Cost budgets of a bench cell: skip a cell whose attention's declared cost is known in advance to exceed
what the sweep allows (eager attention at L = 65,536 would need hundreds of GB), recording the estimate,
instead of letting it exhaust the machine.

Cell options: `max_memory_bytes` (held against `Attention.peak_memory_estimate`) and `max_flops` (held
against `Attention.algorithmic_flops` of the forward pass). An attention that declares nothing is never
skipped: it runs, and an out-of-memory is recorded as `oom`.
"""

from __future__ import annotations

import torch

from cab.attention.base import Attention
from cab.cells import Cell, Outcome
from cab.metrics import BenchMetrics
from cab.status import Status


def over_budget(attn: Attention, cell: Cell) -> "Outcome | None":
    """A `skipped` outcome carrying the estimate when the cell's declared cost exceeds one of its budgets."""
    options = cell.options
    if cell.mode == "decode":
        return None
    max_memory, max_flops = options.get("max_memory_bytes"), options.get("max_flops")
    if max_memory is not None:
        estimate = attn.peak_memory_estimate(cell.batch, cell.lq, cell.lk, cell.kv_heads, cell.mode,
                                             getattr(torch, cell.dtype))
        if estimate is not None and estimate > max_memory:
            message = (f"skipped by memory estimate: {cell.attention} needs about {estimate / 2 ** 30:.1f} GiB "
                       f"for {cell.mode} at Lq={cell.lq}, Lk={cell.lk}, over max_memory_bytes = "
                       f"{max_memory / 2 ** 30:.1f} GiB")
            metrics = BenchMetrics(mem_estimate_bytes=estimate, max_memory_bytes=max_memory)
            return Outcome(Status.SKIPPED, metrics.to_dict(), message)
    if max_flops is not None:
        flops = attn.algorithmic_flops(cell.batch, cell.lq, cell.lk, cell.kv_heads)
        if flops is not None and flops > max_flops:
            message = (f"skipped by FLOP estimate: {cell.attention}'s forward takes {flops:.3g} FLOPs at "
                       f"Lq={cell.lq}, Lk={cell.lk}, over max_flops = {max_flops:.3g}")
            return Outcome(Status.SKIPPED, BenchMetrics(flops_estimate=flops, max_flops=max_flops).to_dict(), message)
    return None
