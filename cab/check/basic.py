"""The checks every declared pattern faces first: `forward` runs, `shape_dtype`, `finite` (with torch.empty*
poisoned by NaN) and `backward` (gradients exist, at least for v, and are all finite)."""

from __future__ import annotations

import torch

from cab.check.gradients import trainable_parameters, vjp
from cab.check.outcomes import CheckOutcome
from cab.check.poison import PoisonEmpty
from cab.check.subject import Shape, Subject, dtype_name
from cab.status import Status


def expected_shape(shape: Shape) -> "tuple[int, int, int, int]":
    return (shape.batch, shape.heads, shape.lq, shape.head_dim)


def shape_problem(out: object, shape: Shape, dtype: torch.dtype) -> "str | None":
    """What is wrong with the output's type, shape or dtype (None when it is right)."""
    if not isinstance(out, torch.Tensor):
        return f"forward returned {type(out).__name__}, not a tensor"
    if tuple(out.shape) != expected_shape(shape):
        return f"output shape {tuple(out.shape)}, expected (B, Hq, Lq, Dv) = {expected_shape(shape)}"
    if out.dtype != dtype:
        return f"output dtype {dtype_name(out.dtype)}, expected the input dtype {dtype_name(dtype)}"
    return None


def nonfinite_summary(tensors: "dict[str, torch.Tensor]") -> "tuple[float, str]":
    """(fraction of non-finite values over all tensors, which tensors hold them and how many)."""
    bad, total, parts = 0, 0, []
    for name, t in tensors.items():
        count = int((~torch.isfinite(t.detach())).sum())
        bad, total = bad + count, total + t.numel()
        if count:
            parts.append(f"{name}: {count} of {t.numel()}")
    return (bad / total if total else 0.0), ", ".join(parts)


def check_forward(subject: Subject) -> CheckOutcome:
    """Build the module (seeded) and run it once on the main shape in the requested dtype."""
    shape = subject.main
    module = subject.module(shape.head_dim, subject.dtype)
    q, k, v = subject.inputs(shape, subject.dtype, "main")
    subject.main_output = subject.run(module, q, k, v)
    return CheckOutcome("forward", Status.OK, message=f"ran on {shape.describe()} in {dtype_name(subject.dtype)}")


def check_shape_dtype(subject: Subject) -> CheckOutcome:
    """The forward output is (B, Hq, Lq, Dv) in the input dtype."""
    problem = shape_problem(subject.main_output, subject.main, subject.dtype)
    if problem:
        return CheckOutcome("shape_dtype", Status.INCORRECT, message=problem)
    return CheckOutcome("shape_dtype", Status.OK, message=f"{expected_shape(subject.main)} {dtype_name(subject.dtype)}")


def check_finite(subject: Subject) -> CheckOutcome:
    """Outputs are finite while every torch.empty* allocation is filled with NaN."""
    shape = subject.main
    module = subject.module(shape.head_dim, subject.dtype)
    q, k, v = subject.inputs(shape, subject.dtype, "main")
    with PoisonEmpty():
        out = subject.run(module, q, k, v)
    fraction, where = nonfinite_summary({"output": out})
    if fraction:
        return CheckOutcome("finite", Status.INCORRECT, fraction, 0.0,
                            f"non-finite outputs with torch.empty* poisoned by NaN ({where})", "fraction")
    return CheckOutcome("finite", Status.OK, 0.0, 0.0, "outputs finite with torch.empty* poisoned by NaN", "fraction")


def poisoned_gradients(subject: Subject, shape: Shape, dtype: torch.dtype, salt: str,
                       ) -> "tuple[torch.Tensor, dict[str, torch.Tensor | None]]":
    """Forward and backward (random cotangent) with torch.empty* poisoned: the output and the gradients
    of q, k, v and every trainable parameter."""
    module = subject.module_for(shape, dtype)
    q, k, v = subject.inputs(shape, dtype, salt, requires_grad=True)
    inputs = {"q": q, "k": k, "v": v, **trainable_parameters(module)}
    with PoisonEmpty():
        out = subject.run(module, q, k, v)
        cotangent = subject.randn(tuple(out.shape), dtype, f"{salt}:dout")
        grads = vjp(out, inputs, cotangent)
    return out, grads


def gradient_problem(grads: "dict[str, torch.Tensor | None]") -> "tuple[float | None, str] | None":
    """(fraction of non-finite values or None, message) when no gradient reaches v (every attention mixes
    values, so its absence means a detached or non-differentiable output) or any gradient is non-finite;
    None when the gradients are fine. q and k may lack one: some mechanisms (state space layers) ignore them."""
    if grads["v"] is None:
        return None, "no gradient reaches v (the output is detached or not differentiable)"
    fraction, where = nonfinite_summary({n: g for n, g in grads.items() if g is not None})
    if fraction:
        return fraction, f"non-finite gradients with torch.empty* poisoned by NaN ({where})"
    return None


def check_backward(subject: Subject) -> CheckOutcome:
    """Backward runs; a gradient reaches v (and q, k unless the mechanism ignores them) and every gradient
    is finite (torch.empty* poisoned)."""
    _, grads = poisoned_gradients(subject, subject.main, subject.dtype, "main")
    problem = gradient_problem(grads)
    if problem:
        error, message = problem
        return CheckOutcome("backward", Status.INCORRECT, error, None if error is None else 0.0, message, "fraction")
    reached = [n for n in ("q", "k", "v") if grads[n] is not None]
    params = [n for n in grads if n not in ("q", "k", "v")]
    unused = [n for n in params if grads[n] is None]
    message = f"finite gradients for {', '.join(reached)} and {len(params) - len(unused)} parameter tensor(s)"
    if len(reached) < 3:
        message += f"; the output does not depend on {', '.join(n for n in 'qkv' if n not in reached)}"
    if unused:
        message += f"; parameters without a gradient in this pattern: {', '.join(unused)}"
    return CheckOutcome("backward", Status.OK, 0.0, 0.0, message, "fraction")
