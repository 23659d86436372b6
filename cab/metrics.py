"""The metrics a result holds, one typed schema per result kind, shared by the writers (cab.bench, cab.check,
cab.training, cab.gpucheck, cab.budget) and the reader (cab.report.tables).

`to_dict()` gives the JSON object the store holds (the keys and values the writers stored before this schema
existed: a field left None is not written). `from_dict()` reads any stored object back and never raises: a
missing key, NULL or NaN is None, a value of the wrong type is None (and kept, under its key, in the record's
`extra`), keys the schema does not name are kept in `extra` (a task's scores in `scores`), so nothing a store
holds is lost. Imports only the standard library: it sits below everything that writes or reads a result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping, TypeVar

R = TypeVar("R", bound="Record")


# ---- tolerant parsers: a value as stored -> the typed value, or None -------------------------------------------

def is_missing(value: Any) -> bool:
    """None or a float NaN: a value a row does not hold."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def as_number(value: Any) -> "float | None":
    """A finite number (an int stays an int, so it is written back unchanged); a numeric string is parsed;
    None for anything missing, boolean, non-numeric or non-finite."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value if math.isfinite(value) else None
    try:
        result = float(value)
    except (TypeError, ValueError):
        return None
    return result if math.isfinite(result) else None


def as_integer(value: Any) -> "int | None":
    """An integral number as an int (a float such as 3.0 from a column with NULLs included), else None."""
    result = as_number(value)
    return None if result is None or result != int(result) else int(result)


def as_text(value: Any) -> "str | None":
    """A scalar as text (what the report displays), None when missing or a list/dict."""
    if is_missing(value) or isinstance(value, (list, tuple, dict)):
        return None
    return str(value)


def as_bool(value: Any) -> "bool | None":
    """A JSON boolean, None otherwise (1 or "true" are not flags a writer stores)."""
    return value if isinstance(value, bool) else None


def as_mapping(value: Any) -> "dict | None":
    """A JSON object as a dict, None otherwise."""
    return dict(value) if isinstance(value, Mapping) else None


def as_list(value: Any) -> "list | None":
    """A JSON array as a list, None otherwise."""
    return list(value) if isinstance(value, (list, tuple)) else None


def as_numbers(value: Any) -> "list | None":
    """A JSON array of numbers (samples, trial medians; a NULL among them, a NaN the writer stored, stays
    None), None when it is not one."""
    items = as_list(value)
    if items is None or any(as_number(v) is None and not is_missing(v) for v in items):
        return None
    return [as_number(v) for v in items]


def _scalar(parse: Callable[[Any], Any]) -> Any:
    return field(default=None, metadata={"parse": parse})


def _part(record: "type[Record]") -> Any:
    return field(default=None, metadata={"part": record})


def _rest() -> Any:
    return field(default_factory=dict, metadata={"rest": True})


# ---- the generic record -----------------------------------------------------------------------------------------

class Record:
    """A dataclass whose fields are stored keys: scalars (metadata 'parse'), parts whose keys are written
    flat in the same object (metadata 'part'), and at most one dict of the keys the schema does not name
    (metadata 'rest'), written at its field's place."""

    @classmethod
    def _read(cls, source: dict) -> "tuple[dict, set, dict]":
        """(field values, keys consumed, values of named keys that did not parse) of `source`."""
        values: dict = {}
        consumed: set = set()
        odd: dict = {}
        for f in fields(cls):  # type: ignore[arg-type]
            if "part" in f.metadata:
                part_values, part_keys, part_odd = f.metadata["part"]._read(source)
                present = part_keys & set(source)
                values[f.name] = f.metadata["part"](**part_values) if present - set(part_odd) else None
                consumed |= part_keys
                odd.update(part_odd)
            elif "parse" in f.metadata:
                consumed.add(f.name)
                if f.name in source:
                    raw = source[f.name]
                    values[f.name] = f.metadata["parse"](raw)
                    if values[f.name] is None and not is_missing(raw):
                        odd[f.name] = raw
        return values, consumed, odd

    @classmethod
    def from_dict(cls: "type[R]", data: Any) -> R:
        """The record of a stored metrics object (anything that is not a dict reads as an empty record)."""
        source = dict(data) if isinstance(data, Mapping) else {}
        values, consumed, odd = cls._read(source)
        rest = [f.name for f in fields(cls) if f.metadata.get("rest")]  # type: ignore[arg-type]
        if rest:
            values[rest[0]] = {k: v for k, v in source.items() if k not in consumed or k in odd}
        return cls(**values)

    def to_dict(self) -> dict:
        """The JSON object the store holds for this record (fields left None are not written)."""
        out: dict = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if "part" in f.metadata:
                if value is not None:
                    out.update(value.to_dict())
            elif f.metadata.get("rest"):
                out.update({k: v for k, v in value.items() if k not in out})
            elif value is not None:
                out[f.name] = value
        return out


# ---- parts shared by bench and decode results ------------------------------------------------------------------

@dataclass(frozen=True)
class Timing(Record):
    """The timing samples of a bench or decode result (cab.bench.timer.TimingStats) and their summary."""

    samples_ms: "list | None" = _scalar(as_numbers)
    median_ms: "float | None" = _scalar(as_number)
    p20_ms: "float | None" = _scalar(as_number)
    p80_ms: "float | None" = _scalar(as_number)
    mean_ms: "float | None" = _scalar(as_number)
    std_ms: "float | None" = _scalar(as_number)
    min_ms: "float | None" = _scalar(as_number)
    max_ms: "float | None" = _scalar(as_number)
    n: "int | None" = _scalar(as_integer)
    cv: "float | None" = _scalar(as_number)
    high_cv: "bool | None" = _scalar(as_bool)
    timer: "str | None" = _scalar(as_text)
    threads: "int | None" = _scalar(as_integer)
    warmup_calls: "int | None" = _scalar(as_integer)


@dataclass(frozen=True)
class Memory(Record):
    """The peak memory of one call (cab.bench.memory): above the pre-call baseline, how it was measured,
    and why it is missing when mem_status is not 'ok'."""

    mem_status: "str | None" = _scalar(as_text)
    peak_mem_bytes: "int | None" = _scalar(as_integer)
    mem_baseline_bytes: "int | None" = _scalar(as_integer)
    mem_method: "str | None" = _scalar(as_text)
    mem_upper_bound: "bool | None" = _scalar(as_bool)
    saved_for_backward_bytes: "int | None" = _scalar(as_integer)
    mem_message: "str | None" = _scalar(as_text)


# ---- one schema per result kind ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class BenchMetrics(Record):
    """A bench result of mode fwd/bwd/fwdbwd: timing, the gate's verdict and coverage, dense FLOPs and the
    throughput they give, the pairs a sparse attention computed, GPU state, memory; a failed gate, an OOM
    while timing (oom_phase) or a cell over budget (the estimates and limits) hold only their fields."""

    timing: "Timing | None" = _part(Timing)
    gate: "str | None" = _scalar(as_text)
    gate_coverage: "dict | None" = _scalar(as_mapping)
    setup_ms: "float | None" = _scalar(as_number)
    flops: "float | None" = _scalar(as_number)
    flops_convention: "str | None" = _scalar(as_text)
    tflops: "float | None" = _scalar(as_number)
    visible_pairs: "float | None" = _scalar(as_number)
    trial_medians_ms: "list | None" = _scalar(as_numbers)
    backend: "str | None" = _scalar(as_text)
    computed_pairs: "int | None" = _scalar(as_integer)
    visible_pairs_total: "float | None" = _scalar(as_number)
    achieved_sparsity: "float | None" = _scalar(as_number)
    gpu_before: "dict | None" = _scalar(as_mapping)
    gpu_after: "dict | None" = _scalar(as_mapping)
    memory: "Memory | None" = _part(Memory)
    oom_phase: "str | None" = _scalar(as_text)
    mem_estimate_bytes: "float | None" = _scalar(as_number)
    max_memory_bytes: "float | None" = _scalar(as_number)
    flops_estimate: "float | None" = _scalar(as_number)
    max_flops: "float | None" = _scalar(as_number)
    extra: dict = _rest()


@dataclass(frozen=True)
class DecodeMetrics(Record):
    """A bench result of mode decode: timing of one incremental step at `context`, the state it holds,
    tokens per second and FLOPs (oom_phase 'decode' when it ran out of memory)."""

    timing: "Timing | None" = _part(Timing)
    gate: "str | None" = _scalar(as_text)
    gate_coverage: "dict | None" = _scalar(as_mapping)
    setup_ms: "float | None" = _scalar(as_number)
    context: "int | None" = _scalar(as_integer)
    trial_medians_ms: "list | None" = _scalar(as_numbers)
    state_bytes: "int | None" = _scalar(as_integer)
    backend: "str | None" = _scalar(as_text)
    tokens_per_s: "float | None" = _scalar(as_number)
    flops: "float | None" = _scalar(as_number)
    tflops: "float | None" = _scalar(as_number)
    oom_phase: "str | None" = _scalar(as_text)
    extra: dict = _rest()


@dataclass(frozen=True)
class CheckMetrics(Record):
    """A check result: the conformance verdict, each check's dict (name, status, error, tolerance, ...),
    what the suite covered, and `declared` where a store records declared support explicitly."""

    verdict: "str | None" = _scalar(as_text)
    checks: "list | None" = _scalar(as_list)
    coverage: "dict | None" = _scalar(as_mapping)
    declared: "bool | None" = _scalar(as_bool)
    extra: dict = _rest()

    def check_dicts(self) -> "list[dict]":
        """The checks that are dicts (a foreign row may list other things)."""
        return [c for c in self.checks or [] if isinstance(c, Mapping)]


@dataclass(frozen=True)
class TaskMetrics(Record):
    """A task (training) result: the task's own scores (what Task.evaluate returns: accuracy, bpc, an
    extrapolation curve, ...), chance level, parameter counts, the training log; a failed gate or a
    divergence holds only its fields."""

    scores: dict = _rest()
    diverged_at_step: "int | None" = _scalar(as_integer)
    chance: "dict | None" = _scalar(as_mapping)
    params_total: "int | None" = _scalar(as_integer)
    params_attention: "int | None" = _scalar(as_integer)
    params_backbone: "int | None" = _scalar(as_integer)
    param_overhead: "float | None" = _scalar(as_number)
    param_flag: "bool | None" = _scalar(as_bool)
    steps: "int | None" = _scalar(as_integer)
    gate: "str | None" = _scalar(as_text)
    gate_attention: "str | None" = _scalar(as_text)
    gate_coverage: "dict | None" = _scalar(as_mapping)
    gate_shapes: "dict | None" = _scalar(as_mapping)
    final_loss: "float | None" = _scalar(as_number)
    loss_curve: "list | None" = _scalar(as_list)
    train_s: "float | None" = _scalar(as_number)
    eval_s: "float | None" = _scalar(as_number)

    def score(self, name: str) -> "float | None":
        """A scalar score (booleans and non-finite values are not scores)."""
        return as_number(self.scores.get(name))


KERNEL_TENSORS = ("out", "dq", "dk", "dv")


@dataclass(frozen=True)
class KernelMetrics(Record):
    """A gpu-check kernel result: the backend that ran, the error floor and slack, and per tensor (out, dq,
    dk, dv) the triton and torch backends' relative errors against float64 and against each other."""

    backend: "str | None" = _scalar(as_text)
    floor: "float | None" = _scalar(as_number)
    slack: "float | None" = _scalar(as_number)
    out_err_triton: "float | None" = _scalar(as_number)
    out_err_torch: "float | None" = _scalar(as_number)
    out_triton_vs_torch: "float | None" = _scalar(as_number)
    dq_err_triton: "float | None" = _scalar(as_number)
    dq_err_torch: "float | None" = _scalar(as_number)
    dq_triton_vs_torch: "float | None" = _scalar(as_number)
    dk_err_triton: "float | None" = _scalar(as_number)
    dk_err_torch: "float | None" = _scalar(as_number)
    dk_triton_vs_torch: "float | None" = _scalar(as_number)
    dv_err_triton: "float | None" = _scalar(as_number)
    dv_err_torch: "float | None" = _scalar(as_number)
    dv_triton_vs_torch: "float | None" = _scalar(as_number)
    extra: dict = _rest()


SCHEMAS = (BenchMetrics, DecodeMetrics, CheckMetrics, TaskMetrics, KernelMetrics)


def schema_of(kind: Any, mode: Any = None) -> "type[Record] | None":
    """The schema of a result of this cell kind (and mode: decode is a bench mode), None for a kind
    this cab does not know."""
    if kind == "bench":
        return DecodeMetrics if mode == "decode" else BenchMetrics
    return {"check": CheckMetrics, "task": TaskMetrics, "kernel": KernelMetrics}.get(kind)


def read_metrics(kind: Any, mode: Any, data: Any) -> "Record | None":
    """The typed metrics of a stored result (None for a kind this cab does not know)."""
    schema = schema_of(kind, mode)
    return None if schema is None else schema.from_dict(data)


__all__ = [
    "BenchMetrics", "CheckMetrics", "DecodeMetrics", "KERNEL_TENSORS", "KernelMetrics", "Memory", "Record", "SCHEMAS",
    "TaskMetrics", "Timing", "as_bool", "as_integer", "as_list", "as_mapping", "as_number", "as_numbers",
    "as_text", "is_missing", "read_metrics", "schema_of",
]
