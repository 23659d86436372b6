"""The bench: timing statistics, sample-count choice, inputs, mode callables, bench_cell and its table."""

from __future__ import annotations

import math
import sys
import types
from dataclasses import dataclass, field

import pytest
import torch

from cab import Attention, Pattern, Status, register_attention
from cab.bench import TimingStats, bench_cell, bench_table, dense_flops, make_inputs, time_callable
from cab.bench import timer as timer_module
from cab.bench.timer import sample_count
from cab.bench.workload import TIMED_MODES, prepare_mode
from cab.cells import Cell, Result
from cab.config import ConfigError
from cab.grid import expand
from cab.registry import unregister_attention
from cab.runner import run_cell

FAST = {"gate": False, "memory": False, "min_run_time_s": 0.005, "warmup_s": 0.0, "min_samples": 5,
        "max_samples": 50}


def tiny_cell(attention: str = "vanilla", pattern: str = "NS", mode: str = "fwd", **fields) -> Cell:
    options = {**FAST, **fields.pop("options", {})}
    base = dict(batch=1, heads=2, kv_heads=2, lq=16, lk=16, head_dim=8)
    return Cell(kind="bench", attention=attention, pattern=pattern, mode=mode, options=options, **{**base, **fields})


# --- statistics -------------------------------------------------------------------------------------------


def test_timing_stats_from_known_samples():
    stats = TimingStats(samples_ms=(7.0, 1.0, 10.0, 3.0, 5.0, 2.0, 9.0, 4.0, 8.0, 6.0), timer="t", threads=3)
    # sorted 1..10: linear-interpolated percentiles sit at rank q/100 * 9
    assert stats.n == 10
    assert stats.median_ms == pytest.approx(5.5)
    assert stats.p20_ms == pytest.approx(1 + 0.2 * 9)
    assert stats.p80_ms == pytest.approx(1 + 0.8 * 9)
    assert stats.mean_ms == pytest.approx(5.5)
    assert stats.std_ms == pytest.approx(math.sqrt(82.5 / 9))  # sum of squared deviations of 1..10 is 82.5
    assert stats.cv == pytest.approx(math.sqrt(82.5 / 9) / 5.5)
    assert stats.high_cv
    assert (stats.min_ms, stats.max_ms) == (1.0, 10.0)
    timing = stats.timing()
    assert timing.samples_ms == list(stats.samples_ms) and timing.threads == 3 and timing.timer == "t"
    assert list(timing.to_dict())[:3] == ["samples_ms", "median_ms", "p20_ms"]


def test_steady_samples_are_not_flagged():
    stats = TimingStats(samples_ms=(2.0, 2.0, 2.02, 1.98), timer="t", threads=1)
    assert stats.cv < 0.05 and not stats.high_cv
    single = TimingStats(samples_ms=(4.0,), timer="t", threads=1)
    assert single.std_ms == 0.0 and single.cv == 0.0
    with pytest.raises(ValueError):
        TimingStats(samples_ms=(), timer="t", threads=1)


@pytest.mark.parametrize("estimate_s,expected", [(0.01, 50), (1.0, 10), (1e-6, 1000), (0.0, 1000), (0.0049, 103)])
def test_sample_count_fills_the_budget_within_bounds(estimate_s, expected):
    assert sample_count(estimate_s, 0.5, 10, 1000) == expected


class FakeClock:
    """A clock that only moves when the timed function (or the untimed hook) says so."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_time_callable_on_a_fake_clock(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(timer_module, "clock", clock)
    # warm-up: a slow first call then two steady ones (1/16 + 2/64 s = warmup_s exactly, binary fractions)
    warm = [1 / 16, 1 / 64, 1 / 64]
    # estimate = median of the warm-up calls after the first = 1/64 s -> ceil(0.5 * 64) = 32 samples
    timed = [(1 + (i % 4)) / 128 for i in range(32)]
    durations = iter(warm + timed)
    hooks = []

    def fn():
        clock.now += next(durations)

    def before_sample():
        hooks.append(clock.now)
        clock.now += 100.0  # outside the timed region: must not show in any sample

    stats = time_callable(fn, device="cpu", min_run_time_s=0.5, warmup_s=1 / 16 + 2 / 64, min_samples=10,
                          max_samples=1000, before_sample=before_sample)
    assert stats.warmup_calls == 3
    assert stats.n == 32
    assert stats.samples_ms == pytest.approx([t * 1e3 for t in timed])
    assert len(hooks) == 3 + 32
    assert stats.timer == "perf_counter" and stats.threads == torch.get_num_threads()
    with pytest.raises(StopIteration):
        next(durations)  # every scripted call was made, none more


def _fake_calls(monkeypatch, *seconds: float):
    """Functions whose every call moves a fake timer clock forward by the given seconds, one per value."""
    clock = FakeClock()
    monkeypatch.setattr(timer_module, "clock", clock)

    def taking(duration):
        def call():
            clock.now += duration
        return call

    return [taking(duration) for duration in seconds]


def test_time_callable_respects_min_and_max_samples(monkeypatch):
    slow, fast = _fake_calls(monkeypatch, 1.0, 1e-6)
    assert time_callable(slow, device="cpu", min_run_time_s=0.5, warmup_s=0.0, min_samples=7).n == 7
    assert time_callable(fast, device="cpu", min_run_time_s=0.5, warmup_s=0.0, max_samples=40).n == 40
    with pytest.raises(ValueError):
        time_callable(fast, device="cpu", min_samples=5, max_samples=4)


def test_warm_up_makes_at_least_min_warmup_calls_and_takes_the_time_budget(monkeypatch):
    slow, fast = _fake_calls(monkeypatch, 1.0, 1 / 64)
    # one call exceeds the 25 ms budget, but the floor is three calls
    assert time_callable(slow, device="cpu", warmup_s=0.025, min_warmup_calls=3, min_samples=2).warmup_calls == 3
    # 3 calls are too few for 0.25 s: the budget decides (16 calls of 1/64 s)
    assert time_callable(fast, device="cpu", warmup_s=0.25, min_warmup_calls=3, min_samples=2).warmup_calls == 16


def test_bench_section_passes_its_warm_up_to_the_cells(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text("name: w\nattentions: [vanilla]\npatterns: [NS]\nbench:\n  lengths: [16]\n  modes: [fwd]\n"
                    "  warmup_s: 0.025\n  min_warmup_calls: 3\n")
    (cell,) = expand(path)
    assert cell.options["warmup_s"] == 0.025 and cell.options["min_warmup_calls"] == 3
    path.write_text("name: w\nattentions: [vanilla]\npatterns: [NS]\nbench:\n  lengths: [16]\n  modes: [fwd]\n"
                    "  warmup_s: 0\n")
    with pytest.raises(ConfigError, match="warmup_s"):
        expand(path)


def test_time_callable_real_cpu_function():
    x = torch.randn(64, 64)
    stats = time_callable(lambda: x @ x, device="cpu", min_run_time_s=0.01, warmup_s=0.0, min_samples=5)
    assert stats.n >= 5 and all(s >= 0 for s in stats.samples_ms)
    assert stats.min_ms <= stats.p20_ms <= stats.median_ms <= stats.p80_ms <= stats.max_ms


# --- inputs and modes -------------------------------------------------------------------------------------


def test_make_inputs_shapes_seeding_and_grad_flags():
    cell = tiny_cell(pattern="NC", batch=2, heads=4, kv_heads=2, lq=5, lk=7, head_dim=6, seed=3, dtype="float64")
    q, k, v, dout = make_inputs(cell, requires_grad=True)
    assert q.shape == (2, 4, 5, 6) and k.shape == (2, 2, 7, 6) and v.shape == (2, 2, 7, 6)
    assert dout.shape == (2, 4, 5, 6)
    assert all(t.dtype == torch.float64 and t.device.type == "cpu" for t in (q, k, v, dout))
    assert q.requires_grad and k.requires_grad and v.requires_grad and not dout.requires_grad
    again = make_inputs(cell, requires_grad=False)
    assert all(torch.equal(a, b) for a, b in zip((q, k, v, dout), again))
    assert not any(t.requires_grad for t in again)
    other = make_inputs(Cell(**{**cell.to_dict(), "seed": 4}), requires_grad=False)
    assert not torch.equal(q, other[0])


class ScaledAttention(Attention):
    """Eager attention times a learned scalar: a module with a parameter, for gradient-reset tests."""

    name = "scaled_test"
    patterns = (Pattern.NS,)

    def __init__(self):
        super().__init__("NS", 2, 8)
        self.gain = torch.nn.Parameter(torch.tensor(1.5))

    def forward(self, q, k, v, key_padding_mask=None):
        return torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v * self.gain


def reference_grads(attn, q, k, v, dout):
    leaves = [q, k, v, attn.gain]
    fresh = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = torch.softmax(fresh[0] @ fresh[1].transpose(-1, -2), dim=-1) @ fresh[2] * attn.gain
    grads = torch.autograd.grad(out, fresh + [attn.gain], dout)
    return leaves, grads


@pytest.mark.parametrize("mode", ["bwd", "fwdbwd"])
def test_backward_modes_reset_gradients_between_samples(mode):
    attn = ScaledAttention()
    inputs = make_inputs(tiny_cell(), requires_grad=True)
    fn, before_sample = prepare_mode(attn, inputs, mode)
    stats = time_callable(fn, device="cpu", min_run_time_s=0.0, warmup_s=0.0, min_samples=4, max_samples=4,
                          before_sample=before_sample)
    assert stats.warmup_calls + stats.n == 5  # five backward passes ran
    leaves, expected = reference_grads(attn, *inputs)
    for leaf, grad in zip(leaves, expected):
        torch.testing.assert_close(leaf.grad, grad)  # one pass's gradient, not five accumulated


def test_without_the_reset_gradients_would_accumulate():
    """The control for the test above: it detects accumulation when the reset is left out."""
    attn = ScaledAttention()
    inputs = make_inputs(tiny_cell(), requires_grad=True)
    fn, _ = prepare_mode(attn, inputs, "bwd")
    time_callable(fn, device="cpu", min_run_time_s=0.0, warmup_s=0.0, min_samples=2, max_samples=2)
    leaves, expected = reference_grads(attn, *inputs)
    torch.testing.assert_close(leaves[0].grad, 3 * expected[0])


def test_inference_mode_runs_without_autograd():
    attn = ScaledAttention()
    fn, before_sample = prepare_mode(attn, make_inputs(tiny_cell(), requires_grad=False), "fwd_infer")
    out = fn()
    assert before_sample is None and out.is_inference() and not attn.training
    train_out, _ = prepare_mode(attn, make_inputs(tiny_cell(), requires_grad=True), "fwd")
    assert train_out().requires_grad and attn.training


# --- bench_cell -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", TIMED_MODES)
@pytest.mark.parametrize("attention,pattern", [("vanilla", "NS"), ("sdpa", "CS"), ("memory_efficient", "CC")])
def test_bench_cell_exact_attentions(attention, pattern, mode):
    lk = 24 if pattern == "CC" else 16
    cell = tiny_cell(attention, pattern, mode, lk=lk)
    outcome = bench_cell(cell)
    assert outcome.status is Status.OK, outcome.message
    m = outcome.metrics
    assert m["n"] >= 5 and len(m["samples_ms"]) == m["n"]
    assert m["min_ms"] <= m["p20_ms"] <= m["median_ms"] <= m["p80_ms"] <= m["max_ms"]
    assert m["flops"] == dense_flops(pattern, 1, 2, 16, lk, 8, 8, mode)
    assert m["tflops"] == pytest.approx(m["flops"] / (m["median_ms"] * 1e-3) / 1e12)
    assert m["visible_pairs"] == (16 * 17 // 2 if pattern == "CS" else 16 * lk)
    assert m["timer"] == "perf_counter" and m["threads"] == torch.get_num_threads() and m["gate"] == "off"
    assert "peak_mem_bytes" not in m  # memory pass off


def test_bench_cell_skips_eager_attention_by_its_memory_estimate():
    outcome = bench_cell(tiny_cell("vanilla", "NS", lq=65536, lk=65536, options={"max_memory_bytes": 2 ** 30}))
    assert outcome.status is Status.SKIPPED and "memory estimate" in outcome.message
    assert outcome.metrics["mem_estimate_bytes"] > 2 ** 30 and "median_ms" not in outcome.metrics


def test_bench_cell_trials_keep_every_sample():
    metrics = bench_cell(tiny_cell("sdpa", "NS", options={"trials": 3})).metrics
    assert len(metrics["trial_medians_ms"]) == 3 and metrics["n"] == len(metrics["samples_ms"]) >= 15


def test_bench_cell_flash_convention_option():
    outcome = bench_cell(tiny_cell("sdpa", "CS", options={"flops_convention": "flash"}))
    assert outcome.metrics["flops"] == dense_flops("CS", 1, 2, 16, 16, 8, 8, "fwd", convention="flash")


def test_bench_cell_through_the_runner_with_the_memory_pass():
    result = run_cell(tiny_cell("vanilla", "CS", "fwd", lq=64, lk=64, options={"memory": True}))
    assert result.status is Status.OK, result.message
    m = result.metrics
    assert m["mem_status"] == "ok" and m["mem_method"] in ("vmhwm_clear_refs", "vmhwm_since_start")
    assert m["peak_mem_bytes"] >= 0 and m["saved_for_backward_bytes"] >= 0


@pytest.fixture
def test_attentions():
    """Registers attentions that are unsupported, unavailable, counting calls, out of memory or broken."""
    calls = []

    @register_attention("bench_test_ns_only", patterns=("NS",), family="test", exact=True,
                        unsupported={"CS": "test attention is noncausal only"})
    class NSOnly(Attention):
        def __init__(self, pattern, num_heads, head_dim):
            super().__init__(pattern, num_heads, head_dim)

        def forward(self, q, k, v, key_padding_mask=None):
            calls.append(q.shape)
            return torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v

    @register_attention("bench_test_unavailable", family="test", exact=True)
    class Unavailable(NSOnly):
        @classmethod
        def unavailable_reason(cls, device):
            return "needs the test accelerator"

    @register_attention("bench_test_oom", family="test", exact=True)
    class OutOfMemory(NSOnly):
        def forward(self, q, k, v, key_padding_mask=None):
            raise MemoryError("cannot allocate the score matrix")

    @register_attention("bench_test_broken", family="test", exact=True)
    class Broken(NSOnly):
        def forward(self, q, k, v, key_padding_mask=None):
            raise RuntimeError("kernel exploded")

    yield calls
    for name in ("bench_test_ns_only", "bench_test_unavailable", "bench_test_oom", "bench_test_broken"):
        unregister_attention(name)


def test_unsupported_pattern_is_unsupported(test_attentions):
    outcome = bench_cell(tiny_cell("bench_test_ns_only", "CS"))
    assert outcome.status is Status.UNSUPPORTED
    assert "noncausal only" in outcome.message and "median_ms" not in outcome.metrics


def test_unavailable_attention_is_unsupported(test_attentions):
    outcome = bench_cell(tiny_cell("bench_test_unavailable"))
    assert outcome.status is Status.UNSUPPORTED and outcome.message == "needs the test accelerator"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message when CUDA is absent")
def test_cuda_cell_without_cuda_is_unsupported():
    outcome = bench_cell(tiny_cell(device="cuda"))
    assert outcome.status is Status.UNSUPPORTED and outcome.message == "CUDA is not available on this machine"


def test_oom_while_timing_is_an_oom_outcome_without_timings(test_attentions):
    outcome = bench_cell(tiny_cell("bench_test_oom"))
    assert outcome.status is Status.OOM and "score matrix" in outcome.message
    assert "median_ms" not in outcome.metrics


def test_other_failures_propagate_to_the_runner_as_errors(test_attentions):
    with pytest.raises(RuntimeError, match="kernel exploded"):
        bench_cell(tiny_cell("bench_test_broken"))
    result = run_cell(tiny_cell("bench_test_broken"))
    assert result.status is Status.ERROR and "kernel exploded" in result.message
    assert "median_ms" not in result.metrics


@dataclass
class FakeReport:
    status: Status
    message: str
    coverage: dict = field(default_factory=lambda: {"shapes": ["published: the cell's"]})


@pytest.fixture
def fake_gate(monkeypatch):
    """Stands in for cab.check.gate: records its arguments and returns the report the test sets."""
    seen = []
    module = types.ModuleType("cab.check")

    def gate(attention, pattern, hparams, device, dtype, shape=None, decode=False):
        seen.append((attention, pattern, hparams, device, dtype))
        module.shapes.append(shape)
        return module.report

    module.gate = gate
    module.shapes = []
    module.published_shape = lambda *sizes: sizes
    module.report = FakeReport(Status.OK, "")
    monkeypatch.setitem(sys.modules, "cab.check", module)
    return module, seen


def test_failing_gate_reports_its_status_and_no_timings(test_attentions, fake_gate):
    module, seen = fake_gate
    module.report = FakeReport(Status.INCORRECT, "output differs from the float64 reference")
    cell = tiny_cell("bench_test_ns_only", options={"gate": True}, dtype="float64")
    outcome = bench_cell(cell)
    assert outcome.status is Status.INCORRECT
    assert outcome.message == "correctness gate failed: output differs from the float64 reference"
    assert "median_ms" not in outcome.metrics and "samples_ms" not in outcome.metrics
    assert test_attentions == []  # the attention never ran
    assert seen == [("bench_test_ns_only", "NS", {}, "cpu", "float64")]


def test_passing_gate_lets_the_timing_run(test_attentions, fake_gate):
    outcome = bench_cell(tiny_cell("bench_test_ns_only", options={"gate": True}))
    assert outcome.status is Status.OK and outcome.metrics["gate"] == "ok" and outcome.metrics["n"] >= 5
    assert len(fake_gate[1]) == 1 and test_attentions
    cell = tiny_cell("bench_test_ns_only")  # the gate is asked about the cell's own shape, and its coverage kept
    assert fake_gate[0].shapes == [(cell.batch, cell.heads, cell.kv_heads, cell.lq, cell.lk, cell.head_dim)]
    assert outcome.metrics["gate_coverage"] == {"shapes": ["published: the cell's"]}


def test_real_correctness_gate_passes_vanilla():
    """cab.check.gate runs the conformance suite (NC: the cheapest pattern to check) before timing."""
    outcome = bench_cell(tiny_cell("vanilla", "NC", lk=24, options={"gate": True}))
    assert outcome.status is Status.OK, outcome.message
    assert outcome.metrics["gate"] == "ok" and outcome.metrics["n"] >= 5


# --- table ------------------------------------------------------------------------------------------------


def test_bench_table_rows():
    ok = Result(cell=tiny_cell("sdpa", "NC", lq=16, lk=32), status=Status.OK, metrics={
        "median_ms": 1.23456, "p20_ms": 1.1, "p80_ms": 1.4, "cv": 0.08, "high_cv": True,
        "peak_mem_bytes": 3 * 1024 * 1024, "mem_status": "ok", "tflops": 0.01234})
    bound = Result(cell=tiny_cell("vanilla", lq=64, lk=64), status=Status.OK, metrics={
        "median_ms": 2.0, "p20_ms": 2.0, "p80_ms": 2.0, "cv": 0.0, "high_cv": False,
        "peak_mem_bytes": 1024 * 1024, "mem_upper_bound": True, "mem_status": "ok", "tflops": 0.5})
    oom_mem = Result(cell=tiny_cell("vanilla", lq=128, lk=128), status=Status.OK, metrics={
        "median_ms": 2.0, "p20_ms": 2.0, "p80_ms": 2.0, "cv": 0.0, "mem_status": "oom", "tflops": 0.5})
    unsupported = Result(cell=tiny_cell("bench_test_ns_only", "CS"), status=Status.UNSUPPORTED,
                         message="does not support CS\nsecond line")
    lines = bench_table([ok, bound, oom_mem, unsupported]).splitlines()
    assert lines[0].split()[:4] == ["attention", "pattern", "mode", "L"] and set(lines[1]) <= {"-", " "}
    assert len(lines) == 6
    assert lines[2].split() == ["sdpa", "NC", "fwd", "16x32", "1.235", "[1.100-1.400]", "8.0%", "!", "3.0",
                                "0.0123", "ok", "-"]
    assert lines[3].split() == ["vanilla", "NS", "fwd", "64", "2.000", "[2.000-2.000]", "0.0%", "<=1.0",
                                "0.5000", "ok", "-"]
    assert lines[4].split()[7] == "oom"
    assert lines[5].split() == ["bench_test_ns_only", "CS", "fwd", "16", "-", "-", "-", "-", "unsupported:",
                                "does", "not", "support", "CS", "-"]


# --- CUDA -------------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@needs_cuda
def test_cuda_event_timer():
    x = torch.randn(512, 512, device="cuda")
    stats = time_callable(lambda: x @ x, device="cuda", min_run_time_s=0.02, warmup_s=0.0, min_samples=5)
    assert stats.timer == "cuda_event" and stats.n >= 5
    assert all(s > 0 for s in stats.samples_ms)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("mode", TIMED_MODES)
def test_bench_cell_on_cuda(mode):
    cell = tiny_cell("sdpa", "CS", mode, device="cuda", lq=256, lk=256, options={"memory": True})
    outcome = bench_cell(cell)
    assert outcome.status is Status.OK, outcome.message
    m = outcome.metrics
    assert m["timer"] == "cuda_event" and m["p20_ms"] <= m["median_ms"] <= m["p80_ms"]
    assert m["mem_status"] == "ok" and m["mem_method"] == "cuda_allocator" and m["peak_mem_bytes"] > 0
    assert ("saved_for_backward_bytes" in m) == (mode == "fwd")


def test_bench_cell_records_backend_and_achieved_sparsity():
    """An attention declaring computed_pairs gets computed/visible pair counts and the achieved sparsity;
    every row names the backend that ran."""

    @register_attention("bench_test_diagonal", patterns=("NS", "CS"), family="test", exact=False)
    class Diagonal(Attention):
        backend = "diag-test"

        def forward(self, q, k, v, key_padding_mask=None):
            return v.expand(q.shape[0], q.shape[1], *v.shape[2:])

        def computed_pairs(self, q, k, v, key_padding_mask=None):
            return q.shape[0] * q.shape[1] * q.shape[2]  # one key per query

    try:
        m = bench_cell(tiny_cell("bench_test_diagonal", "CS")).metrics
        assert m["backend"] == "diag-test"
        assert m["computed_pairs"] == 2 * 16 and m["visible_pairs_total"] == 2 * (16 * 17 // 2)
        assert m["achieved_sparsity"] == pytest.approx(1 - 32 / (2 * 136))
    finally:
        unregister_attention("bench_test_diagonal")
    dense = bench_cell(tiny_cell("sdpa", "NS")).metrics
    assert dense["backend"] == "torch" and "achieved_sparsity" not in dense
