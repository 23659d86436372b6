"""cab.metrics: each result kind's schema writes exactly the JSON object its writer stored before the schema
existed, reads it back unchanged, and reads a malformed or foreign row without raising and without losing
what it does not understand."""

import json
import math

import pytest

from cab.bench.timer import TimingStats
from cab.metrics import (
    BenchMetrics,
    CheckMetrics,
    DecodeMetrics,
    KernelMetrics,
    Memory,
    TaskMetrics,
    as_integer,
    as_number,
    as_text,
    read_metrics,
    schema_of,
)

TIMING = {"samples_ms": [1.0, 2.0, 3.0], "median_ms": 2.0, "p20_ms": 1.4, "p80_ms": 2.6, "mean_ms": 2.0,
          "std_ms": 1.0, "min_ms": 1.0, "max_ms": 3.0, "n": 3, "cv": 0.5, "high_cv": True, "timer": "perf_counter",
          "threads": 2, "warmup_calls": 4}
COVERAGE = {"shapes": ["main: B=2"], "seconds": 1.5}
BENCH = {**TIMING, "gate": "ok", "gate_coverage": COVERAGE, "setup_ms": 3.5, "flops": 1048576,
         "flops_convention": "exact", "tflops": 0.0005, "visible_pairs": 2080, "trial_medians_ms": [2.0],
         "backend": "torch", "computed_pairs": 4096, "visible_pairs_total": 8320, "achieved_sparsity": 0.5,
         "mem_status": "ok", "peak_mem_bytes": 65536, "mem_baseline_bytes": 1 << 30, "mem_method": "vmhwm_clear_refs",
         "saved_for_backward_bytes": 4096}
DECODE = {**TIMING, "gate": "ok", "gate_coverage": COVERAGE, "setup_ms": 1.0, "context": 128,
          "trial_medians_ms": [2.0], "state_bytes": 32768, "backend": "torch", "tokens_per_s": 500.0, "flops": 8192,
          "tflops": 4e-6}
CHECK = {"verdict": "ok", "checks": [{"name": "forward", "status": "ok", "error": None, "tolerance": None}],
         "coverage": COVERAGE}
TASK = {"accuracy": 0.75, "accuracy_by_pairs": {"4": 0.75}, "chance": {"accuracy": 0.0625}, "params_total": 1000,
        "params_attention": 100, "params_backbone": 900, "param_overhead": 0.0, "param_flag": False, "steps": 400,
        "gate": "ok", "gate_shapes": {"sdpa CS": ["B=8"]}, "final_loss": 0.25,
        "loss_curve": [{"step": 1, "loss": 2.0}], "train_s": 12.5, "eval_s": 0.5}
KERNEL = {"backend": "triton", "floor": 0.005, "slack": 4.0,
          **{f"{t}_{e}": 1e-4 for t in ("out", "dq", "dk", "dv")
             for e in ("err_triton", "err_torch", "triton_vs_torch")}}

# each schema against the objects its writers store (ok rows and their failure shapes)
WRITTEN = [
    (BenchMetrics, BENCH),
    (BenchMetrics, {**{k: v for k, v in BENCH.items() if k in TIMING or k in DECODE},  # GPU state before memory
                    "gpu_before": {"sm_clock": 1}, "gpu_after": {"sm_clock": 2},
                    **{k: v for k, v in BENCH.items() if k.startswith(("mem_", "peak", "saved"))}}),
    (BenchMetrics, {**TIMING, "gate": "off", "setup_ms": 1.0, "mem_status": "ok", "peak_mem_bytes": 1,
                    "mem_baseline_bytes": 2, "mem_method": "vmhwm_since_start", "mem_upper_bound": True}),
    (BenchMetrics, {"gate": "incorrect", "gate_coverage": COVERAGE}),
    (BenchMetrics, {"oom_phase": "timing"}),
    (BenchMetrics, {"mem_estimate_bytes": 5e9, "max_memory_bytes": 4294967296}),
    (BenchMetrics, {"flops_estimate": 6e9, "max_flops": 5e9}),
    (BenchMetrics, {**TIMING, "gate": "ok", "mem_status": "timeout", "mem_message": "memory probe exceeded 600 s"}),
    (DecodeMetrics, DECODE),
    (DecodeMetrics, {"oom_phase": "decode"}),
    (CheckMetrics, CHECK),
    (TaskMetrics, TASK),
    (TaskMetrics, {"bpc": 2.5}),
    (TaskMetrics, {"diverged_at_step": 17, "params_total": 1000, "params_attention": 100, "params_backbone": 900,
                   "param_overhead": 0.0, "param_flag": False}),
    (TaskMetrics, {"gate": "incorrect", "gate_attention": "sdpa", "gate_coverage": COVERAGE}),
    (KernelMetrics, KERNEL),
]


@pytest.mark.parametrize("schema, stored", WRITTEN)
def test_a_stored_object_reads_back_and_writes_the_same_json(schema, stored):
    record = schema.from_dict(stored)
    assert json.dumps(record.to_dict()) == json.dumps(stored)  # same keys, same order, same values
    assert schema.from_dict(record.to_dict()) == record
    assert not getattr(record, "extra", {})  # the schema names every key its writers store


def test_records_are_typed():
    bench = BenchMetrics.from_dict(BENCH)
    assert bench.timing.median_ms == 2.0 and bench.timing.high_cv is True and bench.timing.n == 3
    assert bench.memory.peak_mem_bytes == 65536 and bench.gate_coverage == COVERAGE
    task = TaskMetrics.from_dict(TASK)
    assert task.scores == {"accuracy": 0.75, "accuracy_by_pairs": {"4": 0.75}}
    assert task.score("accuracy") == 0.75 and task.score("accuracy_by_pairs") is None
    assert task.chance == {"accuracy": 0.0625} and task.params_total == 1000
    check = CheckMetrics.from_dict({**CHECK, "checks": [CHECK["checks"][0], "not a check"]})
    assert check.check_dicts() == CHECK["checks"]


def test_the_writers_build_the_records():
    stats = TimingStats(samples_ms=(1.0, 2.0, 3.0), timer="perf_counter", threads=2, warmup_calls=4)
    metrics = BenchMetrics(timing=stats.timing(), gate="off", memory=Memory(mem_status="oom", mem_message="m"))
    assert list(metrics.to_dict()) == [*TIMING, "gate", "mem_status", "mem_message"]
    assert BenchMetrics(tflops=None).to_dict() == {}  # a field left None is not written


@pytest.mark.parametrize("data", [None, "text", 3, [1, 2], float("nan"), {}])
def test_anything_that_is_not_an_object_reads_as_an_empty_record(data):
    for kind, mode in (("bench", "fwd"), ("bench", "decode"), ("check", ""), ("task", "train"), ("kernel", "")):
        record = read_metrics(kind, mode, data)
        assert record.to_dict() == {}


def test_malformed_values_read_as_none_and_are_kept():
    stored = {"median_ms": "slow", "p20_ms": None, "p80_ms": float("nan"), "cv": "0.25", "n": 2.0, "high_cv": 1,
              "samples_ms": [1.0, "x"], "peak_mem_bytes": 1.5, "mem_status": 7, "tflops": math.inf,
              "gate_coverage": [1], "brand_new": {"kept": True}}
    bench = BenchMetrics.from_dict(stored)
    timing, memory = bench.timing, bench.memory
    assert timing.median_ms is None and timing.p20_ms is None and timing.p80_ms is None
    assert timing.cv == 0.25 and timing.n == 2 and isinstance(timing.n, int)  # numeric text and integral floats
    assert timing.high_cv is None and timing.samples_ms is None and memory.peak_mem_bytes is None
    assert memory.mem_status == "7" and bench.tflops is None and bench.gate_coverage is None
    # what did not parse is kept under its key, as are the keys the schema does not name
    assert bench.extra == {"median_ms": "slow", "high_cv": 1, "samples_ms": [1.0, "x"], "peak_mem_bytes": 1.5,
                           "tflops": math.inf, "gate_coverage": [1], "brand_new": {"kept": True}}
    assert BenchMetrics.from_dict({"median_ms": "slow"}).timing is None  # no part without a value of its own


def test_unknown_keys_of_a_task_row_are_its_scores():
    task = TaskMetrics.from_dict({"steps": "many", "mse": 0.1, "curve": [1, 2]})
    assert task.steps is None and task.scores == {"steps": "many", "mse": 0.1, "curve": [1, 2]}


def test_the_parsers_follow_the_reports_rules():
    assert as_number(True) is None and as_number("1e3") == 1000.0 and as_number(5) == 5 and as_number(None) is None
    assert as_integer(2.5) is None and as_integer("4") == 4
    assert as_text(float("nan")) is None and as_text(3) == "3" and as_text({"a": 1}) is None


def test_each_kind_has_its_schema():
    assert schema_of("bench", "fwd") is BenchMetrics and schema_of("bench", "decode") is DecodeMetrics
    assert schema_of("check") is CheckMetrics and schema_of("task", "train") is TaskMetrics
    assert schema_of("kernel") is KernelMetrics and schema_of("mystery") is None
    assert read_metrics("mystery", None, {"a": 1}) is None
