"""`odd_shapes`: the checks that shape-dependent code gets wrong, on shapes no block size divides.

Each shape (length 63, or Lq=37 vs Lk=63 for cross patterns; head dim 60; grouped-query heads Hq=4,
Hkv=2 when the attention declares GQA) runs forward and backward with torch.empty* poisoned and must give
the right shape and dtype and finite values; then, where they apply, the oracle agreement (exact
attentions), the reference agreement (attentions with a reference()) and a causality probe (CS, CC).
"""

from __future__ import annotations

from cab.check.agreement import oracle_agreement, reference_agreement
from cab.check.basic import gradient_problem, nonfinite_summary, poisoned_gradients, shape_problem
from cab.check.causality import future_independence
from cab.check.isolation import isolated
from cab.check.outcomes import CheckOutcome
from cab.check.subject import Shape, Subject, main_shape
from cab.patterns import Pattern
from cab.status import Status


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
    if subject.spec.has_reference:
        probes.append(lambda: reference_agreement(subject, shape, shape.label))
    if subject.pattern.causal:
        probes.append(lambda: future_independence(subject, shape))
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
