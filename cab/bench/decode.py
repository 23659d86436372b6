"""Decode benchmarks: the latency of one incremental decoding step at a given context length, and the
bytes of KV cache or recurrent state the attention holds there (BASED's recall-versus-state-size axis,
the decode phase of Lean Attention and Kinetics).

A bench cell with mode "decode" is one context length: Lk = the number of keys the timed step attends.
CS: the state is prefilled with Lk - 1 tokens and the step decodes token Lk (its own key included); CC:
the memory holds Lk keys and the step decodes one query against it. Every sample steps from the same
state (the decode contract keeps a state valid), under inference mode; nothing else enters the timed
region. Batch rows decode in parallel, so tokens/s = batch / step time. Option `trials` repeats the
timing (warm-up included) that many times, keeping every sample and each trial's median.
"""

from __future__ import annotations

import dataclasses

import torch

from cab.attention.base import Attention
from cab.bench.inputs import make_inputs
from cab.bench.timer import TimingStats, time_callable
from cab.bench.workload import build_timed, failed_gate, gate_report
from cab.cells import Cell, Outcome
from cab.devices import device_unavailable
from cab.failures import is_oom
from cab.metrics import DecodeMetrics
from cab.patterns import Pattern
from cab.registry import get_spec
from cab.status import Status

DECODE_MODE = "decode"


def decode_flops(batch: int, heads: int, context: int, dk: int, dv: int) -> int:
    """Dense-equivalent FLOPs of one decoding step: one query row against `context` keys."""
    return 2 * batch * heads * context * (dk + dv)


def prepare_decode(attn: Attention, cell: Cell):
    """(step callable, state after one step) for the cell's context; inputs are drawn like bench inputs."""
    pattern = Pattern.parse(cell.pattern)
    q, k_new, v_new, _ = make_inputs(dataclasses.replace(cell, lq=1, lk=1), requires_grad=False)
    context = cell.lk - 1 if pattern is Pattern.CS else cell.lk
    memory = dataclasses.replace(cell, lq=1, lk=max(context, 1), seed=cell.seed + 1)
    _, k, v, _ = make_inputs(memory, requires_grad=False)
    k, v = k[:, :, :context], v[:, :, :context]
    attn.eval()
    with torch.inference_mode():
        state = attn.decode_init(k, v, capacity=cell.lk)
        if pattern is Pattern.CS:
            def step():
                with torch.inference_mode():
                    return attn.decode_step(state, q, k_new, v_new)
        else:
            def step():
                with torch.inference_mode():
                    return attn.decode_step(state, q)
        _, after = step()
    return step, after


def decode_cell(cell: Cell) -> Outcome:
    """Gate, then time one decoding step at the cell's context length and measure the state it holds."""
    if cell.mode != DECODE_MODE:
        raise ValueError(f"decode_cell runs bench cells of mode {DECODE_MODE!r}, got {cell.mode!r}")
    pattern = Pattern.parse(cell.pattern)
    spec = get_spec(cell.attention)
    reason = device_unavailable(cell.device) or spec.unavailable_reason(cell.device)
    if reason:
        return Outcome(Status.UNSUPPORTED, message=reason)
    if not pattern.causal:
        return Outcome(Status.UNSUPPORTED,
                       message=f"decoding applies to the causal patterns CS and CC, not {pattern.value}")
    if not spec.cls.has_decode():
        return Outcome(Status.UNSUPPORTED,
                       message=f"attention {cell.attention!r} provides no incremental decoding step")
    if pattern is Pattern.CS and cell.lq != cell.lk:
        raise ValueError(f"a causal self decode cell decodes at one context length: Lq = Lk, got {cell.lq}, {cell.lk}")
    built = build_timed(cell)
    if isinstance(built, Outcome):
        return built
    attn, setup_ms = built
    gated = cell.options.get("gate", True) is not False
    verdict = gate_report(cell) if gated else None
    failed = failed_gate(verdict, decode=True) if gated else None
    if failed is not None:
        return failed
    options = cell.options
    try:
        step, state = prepare_decode(attn, cell)
        trials = [time_callable(step, device=cell.device, min_run_time_s=float(options.get("min_run_time_s", 0.5)),
                                warmup_s=float(options.get("warmup_s", 0.1)),
                                min_samples=int(options.get("min_samples", 10)),
                                max_samples=int(options.get("max_samples", 1000)),
                                min_warmup_calls=int(options.get("min_warmup_calls", 1)))
                  for _ in range(int(options.get("trials", 1)))]
    except Exception as exc:
        if not is_oom(exc):
            raise
        return Outcome(Status.OOM, metrics=DecodeMetrics(oom_phase="decode").to_dict(),
                       message=f"out of memory while decoding: {type(exc).__name__}: {str(exc)[:500]}")
    stats = TimingStats(tuple(t for trial in trials for t in trial.samples_ms), trials[0].timer, trials[0].threads,
                        sum(trial.warmup_calls for trial in trials))
    flops = decode_flops(cell.batch, cell.heads, cell.lk, cell.head_dim, cell.head_dim)
    seconds = stats.median_ms * 1e-3
    metrics = DecodeMetrics(
        timing=stats.timing(),
        gate="ok" if gated else "off",
        gate_coverage=verdict.coverage if gated else None,
        setup_ms=setup_ms,
        context=cell.lk,
        trial_medians_ms=[trial.median_ms for trial in trials],
        state_bytes=attn.decode_state_bytes(state),
        backend=str(getattr(attn, "backend", "torch")),
        tokens_per_s=cell.batch / seconds if seconds > 0 else None,
        flops=flops,
        tflops=flops / seconds / 1e12 if seconds > 0 else None,
    )
    return Outcome(Status.OK, metrics=metrics.to_dict())
