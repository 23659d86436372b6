"""The shape probe: the checks that matter at one concrete configuration (shape, dtype, device, backend),
cheap enough to run at every shape a benchmark or a task publishes, and at the fixed suite's large shapes.

At that shape, in that dtype, with the module the cell would build (same hparams, so the same backend):
- `finite`: the output has the right shape and dtype and is finite;
- `batch`: perturbing every batch element but the first leaves the first one's output unchanged;
- `causality` (CS, CC): rows up to a few split points (one just past 512 and one before the last row when the
  length allows) unchanged when the rows after the split are perturbed (q, k, v for CS; q for CC); the copies
  run stacked along the batch, so the probe costs one call;
- `gradient` (CS, CC): no gradient from a row to a later row, at two sampled rows (one backward);
- `padding`: a right-padded element matches the element alone; real rows do not move when left- and
  interior-padded positions hold other garbage;
- `oracle` (exact attentions): sampled query rows, at the full key length, and the gradients of q, k, v
  through them agree with the float64 oracle within twice plain eager attention's error in the dtype.

Each part is isolated; the outcome names every failing part and the seconds the probe took.
"""

from __future__ import annotations

import time

import torch

from cab.check.agreement import held_to_oracle, output_and_grads
from cab.check.basic import nonfinite_summary, shape_problem
from cab.check.causality import gradient_leaks, perturbation_errors
from cab.check.compare import relative_error, structural_tolerance
from cab.check.isolation import isolated
from cab.check.oracle import eager_attention_rows, oracle_attention_rows
from cab.check.outcomes import CheckOutcome, Finding, judged, measured
from cab.check.padding import garbage_errors, left_and_interior, right_padding_errors
from cab.check.subject import Shape, Subject, dtype_name, sample_splits
from cab.status import Status

CAUSAL_SPLITS = 3
GRADIENT_ROWS = 2
ORACLE_ROWS = 6


def _finite(out: torch.Tensor, shape: Shape, dtype: torch.dtype) -> CheckOutcome:
    problem = shape_problem(out, shape, dtype)
    if problem:
        return CheckOutcome("finite", Status.INCORRECT, message=problem)
    fraction, where = nonfinite_summary({"output": out})
    if fraction:
        return CheckOutcome("finite", Status.INCORRECT, fraction, 0.0, f"non-finite outputs ({where})", "fraction")
    return CheckOutcome("finite", Status.OK, 0.0, 0.0, "finite", "fraction")


def _batch(subject: Subject, module, q, k, v, dtype: torch.dtype, salt: str) -> CheckOutcome:
    others = [subject.randn(tuple(t.shape), dtype, f"{salt}:batch:{n}") for n, t in zip("qkv", (q, k, v))]
    moved = [torch.cat([t[:1], o[1:]]) for t, o in zip((q, k, v), others)]
    with torch.no_grad():
        base, changed = subject.run_copies(module, [(q, k, v, None), (*moved, None)])
    error = relative_error(changed[:1], base[:1])
    return measured("batch", error, structural_tolerance(dtype),
                    "batch element 0 with every other element perturbed")


def _causality(subject: Subject, module, q, k, v, full: torch.Tensor, shape: Shape, dtype: torch.dtype,
               salt: str) -> CheckOutcome:
    splits = sample_splits(shape.lq, CAUSAL_SPLITS)
    with torch.no_grad():
        found = perturbation_errors(subject, module, q, k, v, full, splits, f"{salt}:causal")
    return judged("causality", found, structural_tolerance(dtype), f"splits {splits}")


def _gradient(subject: Subject, module, q, k, v, shape: Shape, dtype: torch.dtype, salt: str) -> CheckOutcome:
    rows = sample_splits(shape.lq, GRADIENT_ROWS, salt=1)
    inputs = ("q", "k", "v") if subject.pattern.value == "CS" else ("q",)
    found = gradient_leaks(subject, module, q, k, v, inputs, rows, f"{salt}:grad")
    if not found:
        return CheckOutcome("gradient", Status.OK, message="the output has no gradient (see backward)")
    return judged("gradient", found, structural_tolerance(dtype), f"rows {rows}")


def _padding(subject: Subject, module, shape: Shape, dtype: torch.dtype, salt: str, light: bool) -> CheckOutcome:
    pads = tuple(max(1, shape.lk // (3 + 2 * b)) for b in range(shape.batch))
    found: list[Finding] = []
    with torch.no_grad():
        if not light:
            found += right_padding_errors(subject, module, shape, dtype, f"{salt}:right", pads)
        found += garbage_errors(subject, module, shape, dtype, left_and_interior(shape, subject.device),
                                f"{salt}:inner", "left and interior padded positions")
    return judged("padding", found, structural_tolerance(dtype), dtype_name(dtype))


def _oracle(subject: Subject, module, q, k, v, shape: Shape, dtype: torch.dtype, salt: str) -> CheckOutcome:
    rows = sorted(set(sample_splits(shape.lq + 1, ORACLE_ROWS, salt=2) + [0]))
    pattern = subject.pattern
    cotangent = subject.randn((shape.batch, shape.heads, len(rows), shape.head_dim), dtype, f"{salt}:oracle:dout")
    got = output_and_grads(lambda *a: subject.run(module, *a)[..., rows, :], q, k, v, cotangent, dtype)
    oracle = output_and_grads(lambda *a: oracle_attention_rows(*a, pattern, rows), q, k, v, cotangent, torch.float64)
    eager = output_and_grads(lambda *a: eager_attention_rows(*a, pattern, rows), q, k, v, cotangent, dtype)
    return held_to_oracle("oracle", got, oracle, eager, dtype,
                          where=f" (rows {rows} at the full key length, and their gradients)")


def probe_shape(subject: Subject, shape: Shape, dtype: "torch.dtype | None" = None, name: str = "",
                salt: str = "probe", light: bool = False) -> CheckOutcome:
    """Every part of the probe on `shape` in `dtype` (the requested one by default), as one outcome named
    `name` (default: the shape's label) whose message lists each part. `light` (the fixed suite's large
    shapes, whose right padding the small shapes cover) leaves out the right-padded comparison with the
    element alone."""
    dtype = dtype or subject.dtype
    name = name or shape.label
    start = time.perf_counter()
    module = subject.module_for(shape, dtype)
    q, k, v = subject.inputs(shape, dtype, f"{salt}:{shape.label}")
    full: list[torch.Tensor] = []

    def forward() -> CheckOutcome:
        with torch.no_grad():
            full.append(subject.run(module, q, k, v).clone())
        return _finite(full[0], shape, dtype)

    parts = [isolated("finite", forward)]
    if parts[0].status is Status.OK:
        out = full[0]
        if shape.batch >= 2:
            parts.append(isolated("batch", lambda: _batch(subject, module, q, k, v, dtype, salt)))
        if subject.pattern.causal:
            parts.append(isolated("causality", lambda: _causality(subject, module, q, k, v, out, shape, dtype, salt)))
            parts.append(isolated("gradient", lambda: _gradient(subject, module, q, k, v, shape, dtype, salt)))
        parts.append(isolated("padding", lambda: _padding(subject, module, shape, dtype, salt, light)))
        if subject.spec.exact:
            parts.append(isolated("oracle", lambda: _oracle(subject, module, q, k, v, shape, dtype, salt)))
    seconds = time.perf_counter() - start
    where = f"{shape.describe()} {dtype_name(dtype)}, backend {getattr(module, 'backend', 'torch')}"
    status = Status.worst([p.status for p in parts])
    if status is Status.OK:
        return CheckOutcome(name, Status.OK, message=f"{where}: {', '.join(p.name for p in parts)} ok "
                                                     f"({seconds:.2f} s)")
    failing = [p for p in parts if p.status is not Status.OK]
    decisive = next(p for p in failing if p.status is status)
    detail = "; ".join(f"{p.name}: {p.message}" for p in failing)
    return CheckOutcome(name, status, decisive.error, decisive.tolerance, f"{where}: {detail} ({seconds:.2f} s)",
                        decisive.kind)


def probe_decode(subject: Subject, shape: Shape, dtype: "torch.dtype | None" = None, name: str = "published",
                 salt: str = "probe") -> CheckOutcome:
    """The probe of one incremental decoding step at a published context (shape.lk keys): the step's output is
    finite and equals forward() of that one query against the same keys (CS: the context plus the step's own
    token; CC: the memory)."""
    dtype = dtype or subject.dtype
    start = time.perf_counter()
    module = subject.module_for(shape, dtype)
    q, k, v = subject.inputs(Shape(shape.batch, shape.heads, shape.kv_heads, 1, shape.lk, shape.head_dim),
                             dtype, f"{salt}:decode")
    causal_self = subject.pattern.value == "CS"
    context = shape.lk - 1 if causal_self else shape.lk
    module.eval()
    try:
        with torch.no_grad():
            subject.reseed()
            state = module.decode_init(k[..., :context, :].contiguous(), v[..., :context, :].contiguous(),
                                       capacity=shape.lk)
            if causal_self:
                step, _ = module.decode_step(state, q, k[..., context:, :].contiguous(), v[..., context:, :].contiguous())
            else:
                step, _ = module.decode_step(state, q)
            expected = subject.run(module, q, k, v)
    finally:
        module.train()
    seconds = time.perf_counter() - start
    where = f"one decoding step at context {shape.lk} ({shape.describe()}) in {dtype_name(dtype)}"
    fraction, bad = nonfinite_summary({"step": step})
    if fraction:
        return CheckOutcome(name, Status.INCORRECT, fraction, 0.0, f"{where}: non-finite outputs ({bad})", "fraction")
    outcome = measured(name, relative_error(step, expected), structural_tolerance(dtype),
                       f"{where} vs forward() of that query ({seconds:.2f} s)")
    return outcome
