"""What one bench cell runs: the seeded attention module, and the callable each mode times (shared by the
timing pass, the CPU memory probe and the CUDA memory pass, so all three measure the same work)."""

from __future__ import annotations

import time
from typing import Callable, Optional

import torch

from cab.attention.base import Attention, UnsupportedPattern
from cab.bench.inputs import torch_dtype
from cab.cells import BENCH_MODES, Cell, Outcome
from cab.metrics import BenchMetrics, DecodeMetrics
from cab.registry import create_attention
from cab.status import Status

TIMED_MODES = tuple(m for m in BENCH_MODES if m != "decode")  # whole-sequence passes (decode: cab.bench.decode)

Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # q, k, v, dout


def build_attention(cell: Cell) -> Attention:
    """The cell's attention, built after torch.manual_seed(cell.seed) and moved to its device and dtype.

    Raises UnsupportedPattern when the attention does not declare the cell's pattern."""
    torch.manual_seed(cell.seed)
    attn = create_attention(cell.attention, cell.pattern, cell.heads, cell.head_dim, **cell.hparams)
    return attn.to(device=torch.device(cell.device), dtype=torch_dtype(cell.dtype))


def build_timed(cell: Cell) -> "tuple[Attention, float] | Outcome":
    """(the cell's attention, milliseconds it took to build), or an `unsupported` Outcome when the attention
    does not declare the cell's pattern."""
    start = time.perf_counter()
    try:
        attn = build_attention(cell)
    except UnsupportedPattern as exc:
        return Outcome(Status.UNSUPPORTED, message=str(exc))
    return attn, (time.perf_counter() - start) * 1e3


def needs_grad(mode: str) -> bool:
    """Whether the mode's inputs require grad (every mode but fwd_infer)."""
    return mode != "fwd_infer"


def prepare_mode(
    attn: Attention, inputs: Inputs, mode: str
) -> "tuple[Callable[[], object], Optional[Callable[[], None]]]":
    """(fn, before_sample) for a mode; fn returns what it computed so a caller may keep it alive.

    fwd: training-mode forward with autograd on. fwd_infer: eval-mode forward under inference_mode.
    bwd: the forward runs once here, fn is `out.backward(dout, retain_graph=True)`. fwdbwd: forward and
    backward in one call. For bwd and fwdbwd, before_sample sets .grad = None on the inputs and the
    module's parameters so no sample times a gradient accumulation."""
    if mode not in TIMED_MODES:
        raise ValueError(f"mode must be one of {', '.join(TIMED_MODES)}, got {mode!r}")
    q, k, v, dout = inputs
    attn.train(needs_grad(mode))
    if mode == "fwd":
        return (lambda: attn(q, k, v)), None
    if mode == "fwd_infer":
        def infer() -> torch.Tensor:
            with torch.inference_mode():
                return attn(q, k, v)

        return infer, None

    leaves = [t for t in (q, k, v) if t.requires_grad] + [p for p in attn.parameters() if p.requires_grad]

    def reset_grads() -> None:
        for leaf in leaves:
            leaf.grad = None

    if mode == "bwd":
        out = attn(q, k, v)
        return (lambda: out.backward(dout, retain_graph=True)), reset_grads
    return (lambda: attn(q, k, v).backward(dout)), reset_grads


def gate_report(cell: Cell):
    """The correctness gate's report for the cell (cab.check.gate): the fixed suite of its configuration and
    the shape probe at the cell's own shape (decode cells: the probe of one decoding step at their context)."""
    from cab.check import gate, published_shape

    decode = cell.mode == "decode"
    shape = published_shape(cell.batch, cell.heads, cell.kv_heads, 1 if decode else cell.lq, cell.lk, cell.head_dim)
    return gate(cell.attention, cell.pattern, cell.hparams, cell.device, cell.dtype, shape, decode=decode)


def failed_gate(report, decode: bool = False) -> "Outcome | None":
    """The cell's outcome when the gate's report failed, None when it passed: no speed is reported for a
    configuration whose conformance checks fail (`decode`: the metrics of a decode cell)."""
    if report.status is Status.OK:
        return None
    schema = DecodeMetrics if decode else BenchMetrics
    return Outcome(report.status, metrics=schema(gate=report.status.value, gate_coverage=report.coverage).to_dict(),
                   message=f"correctness gate failed: {report.message}")
