"""Shape checks: `odd_shapes`, the checks that shape-dependent code gets wrong, on shapes no block size
divides, and `large_shapes`, the shape probe (cab.check.probe) on the fixed suite's long and wide shapes.

Each odd shape (length 63, or Lq=37 vs Lk=63 for cross patterns; head dim 60; grouped-query heads Hq=4,
Hkv=2 when the attention declares GQA) runs forward and backward with torch.empty* poisoned and must give
the right shape and dtype and finite values; then, where they apply, the oracle agreement (exact
attentions), the reference agreement (attentions with a reference(); see REFERENCE_ON) and a causality
probe at 6 sampled splits (CS, CC). The large shapes (cab.check.subject.large_shapes: L=1536 with head
dim 64; 8 heads with head dim 128) run the probe in the requested dtype: where a kernel dispatches on
length, tile or head dim, it is checked there.
"""

from __future__ import annotations

from cab.check.agreement import oracle_agreement, reference_agreement
from cab.check.basic import gradient_problem, nonfinite_summary, poisoned_gradients, shape_problem
from cab.check.causality import future_independence
from cab.check.isolation import isolated
from cab.check.outcomes import CheckOutcome
from cab.check.probe import probe_shape
from cab.check.subject import Shape, Subject, large_shapes, main_shape, sample_splits
from cab.failures import CellTimeout
from cab.patterns import Pattern
from cab.status import Status

ODD_SPLITS = 6  # causality splits probed on each odd shape (the main shape's checks cover every row)
# a naive reference() is the slowest thing the suite runs: it is compared, outputs and gradients, on the odd
# length (tails, where fast paths go wrong) and, outputs only, on the grouped heads (the head mapping); not
# again at head dim 60
REFERENCE_ON = {"length 63x63": True, "length 37x63": True, "GQA 4/2": False}


def odd_shapes(pattern: Pattern, gqa: bool) -> "list[Shape]":
    """The odd shapes for a pattern; the GQA one only when the attention declares grouped-query heads."""
    main = main_shape(pattern)
    lq, lk = (37, 63) if pattern.cross else (63, 63)
    shapes = [
        Shape(main.batch, main.heads, main.kv_heads, lq, lk, main.head_dim, f"length {lq}x{lk}"),
        Shape(main.batch, main.heads, main.kv_heads, main.lq, main.lk, 60, "head dim 60"),
    ]
    if gqa:
        shapes.append(Shape(main.batch, 4, 2, main.lq, main.lk, main.head_dim, "GQA 4/2"))
    return shapes


def _one_shape(subject: Subject, shape: Shape) -> CheckOutcome:
    """Every applicable sub-check on one shape; the first failure decides."""
    out, grads = poisoned_gradients(subject, shape, subject.dtype, shape.label)
    problem = shape_problem(out, shape, subject.dtype)
    if problem:
        return CheckOutcome(shape.label, Status.INCORRECT, message=problem)
    fraction, where = nonfinite_summary({"output": out})
    if fraction:
        return CheckOutcome(shape.label, Status.INCORRECT, fraction, 0.0,
                            f"non-finite outputs with torch.empty* poisoned by NaN ({where})")
    grad_issue = gradient_problem(grads)
    if grad_issue:
        return CheckOutcome(shape.label, Status.INCORRECT, grad_issue[0], None, grad_issue[1])
    verified = ["shape", "finite", "gradients"]
    probes = []
    if subject.spec.exact:
        probes.append(lambda: oracle_agreement(subject, shape, shape.label))
    if subject.spec.has_reference and shape.label in REFERENCE_ON:
        gradients = REFERENCE_ON[shape.label]
        probes.append(lambda: reference_agreement(subject, shape, shape.label, gradients=gradients))
    if subject.pattern.causal:
        probes.append(lambda: future_independence(subject, shape, splits=sample_splits(shape.lq, ODD_SPLITS)))
    for probe in probes:
        outcome = probe()
        if outcome.status is not Status.OK:
            return CheckOutcome(shape.label, outcome.status, outcome.error, outcome.tolerance,
                                f"{outcome.name}: {outcome.message}")
        verified.append(outcome.name)
    return CheckOutcome(shape.label, Status.OK, message=", ".join(verified))


def check_odd_shapes(subject: Subject) -> CheckOutcome:
    """Run every odd shape (each isolated); the worst decides, every failing shape is named."""
    shapes = odd_shapes(subject.pattern, subject.spec.supports_gqa)
    parts = [isolated(shape.label, lambda s=shape: _one_shape(subject, s)) for shape in shapes]
    described = {s.label: s.describe() for s in shapes}
    status = Status.worst([p.status for p in parts])
    note = "" if subject.spec.supports_gqa else "; grouped-query heads not declared (gqa=False), not tested"
    if status is Status.OK:
        return CheckOutcome("odd_shapes", Status.OK,
                            message="; ".join(f"{p.name} ({p.message})" for p in parts) + note)
    failing = [p for p in parts if p.status is not Status.OK]
    decisive = next(p for p in failing if p.status is status)
    message = "; ".join(f"{p.name} [{described[p.name]}]: {p.message}" for p in failing) + note
    return CheckOutcome("odd_shapes", status, decisive.error, decisive.tolerance, message)


# The large shapes are skipped for an attention whose declared cost there (algorithmic_flops,
# peak_memory_estimate) is beyond what the suite affords; a benchmark at such a size would be skipped by the
# same declarations under the default budgets (configs/quick.yaml), and its own probe covers it when it runs.
LARGE_MAX_FLOPS = 5e9
LARGE_MAX_BYTES = 2 * 2 ** 30


def unbuildable(subject: Subject, shape: Shape) -> "str | None":
    """Why the cell's hyper-parameters cannot build the attention for `shape`'s head count (per-head values
    fix it), or None. With default hyper-parameters every head count must build: a failure is then raised."""
    try:
        subject.module_for(shape, subject.dtype)
    except CellTimeout:
        raise
    except (Exception, SystemExit) as exc:
        if not subject.hparams:
            raise
        return f"the hyper-parameters {sorted(subject.hparams)} do not build {shape.heads} heads ({exc})"
    return None


def too_costly(subject: Subject, shape: Shape) -> "str | None":
    """Why `shape` is beyond the suite's budget for this attention (None when it is affordable)."""
    module = subject.module_for(shape, subject.dtype)
    flops = module.algorithmic_flops(shape.batch, shape.lq, shape.lk, shape.kv_heads)
    if flops is not None and flops > LARGE_MAX_FLOPS:
        return f"declared forward cost {flops:.2g} FLOPs > {LARGE_MAX_FLOPS:.0g}"
    memory = module.peak_memory_estimate(shape.batch, shape.lq, shape.lk, shape.kv_heads, "fwd", subject.dtype)
    if memory is not None and memory > LARGE_MAX_BYTES:
        return f"declared peak memory {memory / 2 ** 30:.1f} GiB > {LARGE_MAX_BYTES / 2 ** 30:.0f} GiB"
    return None


LARGE_PARTS = {  # the long shape runs no backward (gradients, padding, batches: the small and wide shapes')
    "long": frozenset({"finite", "oracle_rows", "causality"}),
    "wide": frozenset({"finite", "gradient", "oracle", "causality", "batch", "padding"}),
}


def check_large_shapes(subject: Subject) -> CheckOutcome:
    """The shape probe on each of the suite's affordable large shapes (each isolated), on one CPU thread like
    the rest of the suite (a second thread saved little at these sizes and cost several times the work on a
    busy machine); every failing shape is named, every skipped one with the reason (also in the verdict's
    coverage, as not run)."""
    parts, skipped = [], []
    for shape in large_shapes(subject.pattern, subject.spec.supports_gqa):
        reason = unbuildable(subject, shape) or too_costly(subject, shape)
        if reason:
            skipped.append(f"{shape.label} [{shape.describe()}] skipped: {reason}")
            subject.not_run[f"large_shapes:{shape.label}"] = reason
            continue
        parts.append(isolated(shape.label, lambda s=shape: probe_shape(subject, s, subject.dtype, s.label, "large",
                                                                       LARGE_PARTS[s.label])))
    status = Status.worst([p.status for p in parts])
    if status is Status.OK:
        return CheckOutcome("large_shapes", Status.OK,
                            message="; ".join([f"{p.name} ({p.message})" for p in parts] + skipped))
    failing = [p for p in parts if p.status is not Status.OK]
    decisive = next(p for p in failing if p.status is status)
    return CheckOutcome("large_shapes", status, decisive.error, decisive.tolerance,
                        "; ".join(f"{p.name}: {p.message}" for p in failing), decisive.kind)
