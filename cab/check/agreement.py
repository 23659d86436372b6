"""Agreement checks, outputs and every gradient: `reference` (forward vs the attention's own naive
`reference()`, in the structural dtype, relative tolerance) and `exact_oracle` (an exact attention vs the
independent float64 oracle, in the requested dtype, allowed 2x the error of plain eager attention there)."""

from __future__ import annotations

import math
from typing import Callable

import torch

from cab.check.compare import (
    HALF_L2_TOLERANCE,
    HALF_PRECISION,
    abs_error,
    max_abs,
    oracle_allowance,
    relative_error,
    relative_l2,
    structural_tolerance,
)
from cab.check.gradients import trainable_parameters, vjp
from cab.check.oracle import eager_attention, oracle_attention
from cab.check.outcomes import CheckOutcome, Finding, judged, measured
from cab.check.subject import Shape, Subject, dtype_name
from cab.status import Status

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def output_and_grads(attend: Attend, q, k, v, cotangent: "torch.Tensor | None", dtype: torch.dtype,
                      params: "dict[str, torch.Tensor] | None" = None) -> "dict[str, torch.Tensor | None]":
    """{"output", "dq", "dk", "dv", "d<param>"...} of `attend` on fresh leaf copies of q, k, v in `dtype`
    ({"output"} alone, computed without autograd, when `cotangent` is None)."""
    if cotangent is None:
        with torch.no_grad():
            return {"output": attend(*(t.detach().to(dtype) for t in (q, k, v)))}
    leaves = {n: t.detach().to(dtype).requires_grad_() for n, t in zip("qkv", (q, k, v))}
    out = attend(leaves["q"], leaves["k"], leaves["v"])
    grads = vjp(out, {**leaves, **(params or {})}, cotangent.to(dtype))
    return {"output": out, **{f"d{name}": g for name, g in grads.items()}}


def reference_agreement(subject: Subject, shape: Shape, salt: str, dtype: "torch.dtype | None" = None,
                        gradients: bool = True) -> CheckOutcome:
    """forward vs reference() on the same module and inputs: outputs and gradients of q, k, v, parameters
    (outputs only with gradients=False).

    In the structural dtype both run in it (the tight check). In another dtype, forward runs in that dtype
    and reference() in the structural one on the same (rounded) inputs and cotangent, and the relative error
    is held to that dtype's tolerance: the check then asks whether the fast path in the published dtype
    computes the naive formulation, to that dtype's precision."""
    structural, note = subject.structural()
    dtype = dtype or structural
    truth = structural
    reference_module = subject.truth_for(shape, subject.dtype, truth)
    module = reference_module if dtype == truth else subject.module_for(shape, dtype)
    # inputs and cotangent in the requested dtype (exactly representable in the structural one), so that both
    # comparisons share one run of the (slow, naive) reference()
    q, k, v = subject.inputs(shape, subject.dtype, salt)
    cotangent = None
    if gradients:
        cotangent = subject.randn((shape.batch, shape.heads, shape.lq, shape.head_dim), subject.dtype, f"{salt}:dout")
    params = trainable_parameters(module)
    forward = output_and_grads(lambda *a: subject.run(module, *a), q, k, v, cotangent, dtype, params)
    key = ("reference", shape, salt, id(reference_module), gradients)
    if key not in subject.memo:
        subject.memo[key] = output_and_grads(lambda *a: subject.run_reference(reference_module, *a), q, k, v,
                                             cotangent, truth, trainable_parameters(reference_module))
    reference = subject.memo[key]
    half = dtype in HALF_PRECISION and truth != dtype
    compare = relative_l2 if half else relative_error
    found: list[Finding] = []
    for name, expected in reference.items():
        actual = forward[name]
        if actual is None and expected is None:
            continue
        if actual is None or expected is None:
            found.append((math.inf, f"{name} exists only in {'reference()' if actual is None else 'forward'}"))
        else:
            found.append((compare(actual, expected), f"{name} of forward vs reference()"))
    context = (dtype_name(dtype) if truth == dtype
               else f"forward in {dtype_name(dtype)}, reference() in {dtype_name(truth)}")
    if half:
        return judged("reference", found, HALF_L2_TOLERANCE, context + "; relative L2, a content-based choice may "
                      "flip in half precision", kind="relative L2")
    return judged("reference", found, structural_tolerance(dtype), context, note if dtype == structural else "")


def oracle_agreement_on(subject: Subject, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, salt: str,
                        max_logit: float = 0.0) -> CheckOutcome:
    """An exact attention in the inputs' dtype vs the float64 oracle on these inputs: the max-abs error of the
    output and of dq, dk, dv may be at most 2x plain eager attention's error in that dtype plus a few ulps
    (the outcome reports the tensor closest to, or furthest over, its allowance). `max_logit`: the largest
    |score| of these inputs when it is far beyond unit scale (see oracle_allowance)."""
    dtype = q.dtype
    shape = Shape(q.shape[0], q.shape[1], k.shape[1], q.shape[-2], k.shape[-2], q.shape[-1])
    module = subject.module_for(shape, dtype)
    cotangent = subject.randn((shape.batch, shape.heads, shape.lq, shape.head_dim), dtype, f"{salt}:dout")
    pattern = subject.pattern
    got = output_and_grads(lambda *a: subject.run(module, *a), q, k, v, cotangent, dtype)
    oracle = output_and_grads(lambda *a: oracle_attention(*a, pattern), q, k, v, cotangent, torch.float64)
    eager = output_and_grads(lambda *a: eager_attention(*a, pattern), q, k, v, cotangent, dtype)
    return held_to_oracle("exact_oracle", got, oracle, eager, dtype, max_logit)


def held_to_oracle(name: str, got: dict, oracle: dict, eager: dict, dtype: torch.dtype, max_logit: float = 0.0,
                   where: str = "") -> CheckOutcome:
    """The outcome of holding each of `got`'s tensors (output, dq, dk, dv) to the float64 `oracle`'s, each
    allowed 2x plain `eager` attention's error in `dtype` plus a few ulps; it reports the tensor closest to,
    or furthest over, its allowance."""
    worst: "tuple[float, float, float, str] | None" = None  # (error / allowed, error, allowed, detail)
    for tensor, expected in oracle.items():
        if got[tensor] is None:
            return CheckOutcome(name, Status.INCORRECT, message=f"no gradient reaches {tensor[1:]}{where}")
        error = abs_error(got[tensor], expected)
        baseline = abs_error(eager[tensor], expected)
        allowed = oracle_allowance(baseline, max_abs(expected), dtype, max_logit)
        ratio = error / allowed if allowed > 0 else math.inf
        detail = (f"{tensor}{where}: max abs error vs the float64 oracle in {dtype_name(dtype)} "
                  f"(plain eager attention: {baseline:.2e})")
        if worst is None or not ratio <= worst[0]:
            worst = (ratio, error, allowed, detail)
    _, error, allowed, detail = worst
    return measured(name, error, allowed, detail, kind="absolute")


def oracle_agreement(subject: Subject, shape: Shape, salt: str) -> CheckOutcome:
    """`oracle_agreement_on` the subject's inputs of `shape` in the requested dtype."""
    q, k, v = subject.inputs(shape, subject.dtype, salt)
    return oracle_agreement_on(subject, q, k, v, salt)


def check_reference(subject: Subject, dtype: "torch.dtype | None" = None) -> CheckOutcome:
    """forward agrees with the attention's own reference() on the main shape."""
    return reference_agreement(subject, subject.main, "reference", dtype)


def check_exact_oracle(subject: Subject) -> CheckOutcome:
    """An exact attention agrees with the float64 oracle on the main shape."""
    return oracle_agreement(subject, subject.main, "exact_oracle")
