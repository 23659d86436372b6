"""`bench_cell`: the runner of a "bench" cell — correctness gate, timing of one mode, memory pass, FLOPs."""

from __future__ import annotations

import torch

from cab.analysis.hardware import gpu_state
from cab.bench.flops import dense_flops
from cab.bench.inputs import make_inputs
from cab.bench.memory import measure_memory
from cab.bench.timer import TimingStats, time_callable
from cab.bench.workload import build_timed, failed_gate, gate_report, needs_grad, prepare_mode
from cab.budget import over_budget
from cab.cells import BENCH_MODES, Cell, Outcome
from cab.devices import device_unavailable
from cab.failures import is_oom
from cab.kinds import register_cell_kind
from cab.metrics import BenchMetrics
from cab.patterns import visible_pairs
from cab.registry import get_spec
from cab.status import Status


def _time_mode(attn: torch.nn.Module, cell: Cell) -> "list[TimingStats]":
    """Build the inputs (outside the timed region) and time the cell's mode with its options, once per
    trial (option `trials`, default 1; each trial warms up again)."""
    options = cell.options
    fn, before_sample = prepare_mode(attn, make_inputs(cell, needs_grad(cell.mode)), cell.mode)
    return [
        time_callable(
            fn, device=cell.device, before_sample=before_sample,
            min_run_time_s=float(options.get("min_run_time_s", 0.5)), warmup_s=float(options.get("warmup_s", 0.1)),
            min_samples=int(options.get("min_samples", 10)), max_samples=int(options.get("max_samples", 1000)),
            min_warmup_calls=int(options.get("min_warmup_calls", 1)),
        )
        for _ in range(int(options.get("trials", 1)))
    ]


def _pair_metrics(attn: torch.nn.Module, cell: Cell) -> dict:
    """The BenchMetrics fields computed_pairs (all batch rows and heads), visible_pairs_total (what a dense
    attention computes) and achieved_sparsity 1 - computed / visible, for attentions that declare
    `computed_pairs`; {} otherwise."""
    if not attn.has_computed_pairs():
        return {}
    q, k, v, _ = make_inputs(cell, requires_grad=False)
    with torch.no_grad():
        computed = attn.computed_pairs(q, k, v)
    if computed is None:
        return {}
    visible = cell.batch * cell.heads * visible_pairs(cell.pattern, cell.lq, cell.lk)
    return {"computed_pairs": int(computed), "visible_pairs_total": visible,
            "achieved_sparsity": 1.0 - int(computed) / visible if visible else None}


def describe_bench(cell: Cell) -> str:
    """`name pattern L=… [kv=…] mode` for the progress bar."""
    lengths = f"L={cell.lq}" if cell.lq == cell.lk else f"L={cell.lq}/{cell.lk}"
    kv = f" kv={cell.kv_heads}" if cell.kv_heads != cell.heads else ""
    return f"{cell.display_name} {cell.pattern} {lengths}{kv} {cell.mode}"


@register_cell_kind("bench", describe=describe_bench, runs_alone=True)  # timings
def bench_cell(cell: Cell) -> Outcome:
    """Gate, then time and measure one attention in one mode (decode cells go to cab.bench.decode); an
    unsupported configuration, a failed gate, a cost over budget or an OOM while timing is an Outcome without
    timings. Other exceptions propagate (the runner records
    them as errors), so partial timings are never reported as ok."""
    if cell.kind != "bench":
        raise ValueError(f"bench_cell runs cells of kind 'bench', got {cell.kind!r}")
    if cell.mode not in BENCH_MODES:
        raise ValueError(f"bench mode must be one of {', '.join(BENCH_MODES)}, got {cell.mode!r}")
    if cell.mode == "decode":
        from cab.bench.decode import decode_cell

        return decode_cell(cell)
    reason = device_unavailable(cell.device) or get_spec(cell.attention).unavailable_reason(cell.device)
    if reason:
        return Outcome(Status.UNSUPPORTED, message=reason)
    built = build_timed(cell)
    if isinstance(built, Outcome):
        return built
    attn, setup_ms = built
    skipped = over_budget(attn, cell)  # max_memory_bytes / max_flops against the attention's declared costs
    if skipped is not None:
        return skipped

    gated = cell.options.get("gate", True) is not False
    verdict = gate_report(cell) if gated else None
    failed = failed_gate(verdict) if gated else None
    if failed is not None:
        return failed

    gpu_before = gpu_state(cell.device)  # NVML clocks and throttle reasons ({} off CUDA or without pynvml)
    try:
        trials = _time_mode(attn, cell)
    except Exception as exc:
        if not is_oom(exc):
            raise
        return Outcome(Status.OOM, metrics=BenchMetrics(oom_phase="timing").to_dict(),
                       message=f"out of memory while timing: {type(exc).__name__}: {str(exc)[:500]}")
    pairs = _pair_metrics(attn, cell)
    backend = str(getattr(attn, "backend", "torch"))
    del attn
    stats = TimingStats(tuple(t for trial in trials for t in trial.samples_ms), trials[0].timer, trials[0].threads,
                        sum(trial.warmup_calls for trial in trials))

    convention = cell.options.get("flops_convention", "exact")
    flops = dense_flops(cell.pattern, cell.batch, cell.heads, cell.lq, cell.lk, cell.head_dim, cell.head_dim,
                        cell.mode, convention=convention)
    metrics = BenchMetrics(
        timing=stats.timing(),
        gate="ok" if gated else "off",
        gate_coverage=verdict.coverage if gated else None,
        setup_ms=setup_ms,
        flops=flops,
        flops_convention=convention,
        tflops=flops / (stats.median_ms * 1e-3) / 1e12 if stats.median_ms > 0 else None,
        visible_pairs=visible_pairs(cell.pattern, cell.lq, cell.lk, convention=convention),  # per (B, H)
        trial_medians_ms=[trial.median_ms for trial in trials],
        backend=backend,
        **pairs,
        gpu_before=gpu_before or None,
        gpu_after=gpu_state(cell.device) if gpu_before else None,
        memory=measure_memory(cell) if cell.options.get("memory", True) else None,
    )
    return Outcome(Status.OK, metrics=metrics.to_dict())
