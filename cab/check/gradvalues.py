"""`gradients`: the values of the gradients, for every attention, by directional finite differences.

For f(x) = <forward(x), c> with a fixed random cotangent c, the directional derivative along a random
direction d from the backward pass, <df/dx, d>, must match the central difference
(f(x + eps d) - f(x - eps d)) / (2 eps), for x = q, k, v (without and with a left/interior key padding mask,
garbage at the padded positions) and for all trainable parameters at once. A direction where the difference
at eps and at 2 eps disagree crosses a kink or a discrete choice (a top-k, an argmin); it is replaced by
another direction, and the check notes it. The perturbed copies of q, k, v run stacked along the batch.
Runs in float64 (the only dtype where a difference quotient is accurate); an attention without float64
support gets a float32 run at a coarser step and tolerance, which catches gross errors only.
"""

from __future__ import annotations

import torch

from cab.check.gradients import trainable_parameters, vjp
from cab.check.outcomes import CheckOutcome, Finding, judged
from cab.check.padding import left_and_interior, padded_inputs
from cab.check.subject import Subject, dtype_name
from cab.status import Status

STEP = {torch.float64: 1e-6, torch.float32: 1e-2}
TOLERANCE = {torch.float64: 1e-5, torch.float32: 5e-2}
ATTEMPTS = 3  # directions tried per input before it is declared non-smooth


def _value(out: torch.Tensor, cotangent: torch.Tensor) -> float:
    return float((out.to(torch.float64) * cotangent.to(torch.float64)).sum())


def _compare(analytic: float, scale: float, fd: float) -> float:
    """|analytic - fd| relative to sum |df/dx_i d_i| (a scale that cancellation inside the sum cannot hide)."""
    denominator = max(scale, abs(fd), 1e-300)
    return abs(analytic - fd) / denominator


def _input_findings(subject: Subject, module, q, k, v, mask, cotangent, dtype, salt: str,
                    what: str) -> "tuple[list[Finding], list[str]]":
    """Finite differences for q, k and v against the backward pass: one random direction per input, the
    perturbed copies of all three stacked into one call; an input whose direction proves non-smooth gets the
    next direction (up to ATTEMPTS)."""
    eps, tol = STEP[dtype], TOLERANCE[dtype]
    leaves = {n: t.detach().clone().requires_grad_() for n, t in zip("qkv", (q, k, v))}
    out = subject.run(module, leaves["q"], leaves["k"], leaves["v"], key_padding_mask=mask)
    grads = vjp(out, leaves, cotangent)
    base = {n: t.detach() for n, t in leaves.items()}
    found, pending = [], list("qkv")
    for attempt in range(ATTEMPTS):
        if not pending:
            break
        directions = {n: subject.randn(tuple(base[n].shape), dtype, f"{salt}:{n}:{attempt}") for n in pending}
        steps = (eps, -eps, 2 * eps, -2 * eps)
        copies = [tuple({**base, n: base[n] + step * directions[n]}[m] for m in "qkv") + (mask,)
                  for n in pending for step in steps]
        with torch.no_grad():
            values = iter([_value(o, cotangent) for o in subject.run_copies(module, copies)])
        rough = []
        for name in pending:
            f1, f2, f3, f4 = (next(values) for _ in steps)
            fd1, fd2 = (f1 - f2) / (2 * eps), (f3 - f4) / (4 * eps)
            grad, d = grads[name], directions[name].to(torch.float64)
            analytic = 0.0 if grad is None else float((grad.to(torch.float64) * d).sum())
            scale = 0.0 if grad is None else float((grad.to(torch.float64) * d).abs().sum())
            if _compare(fd1, scale, fd2) > tol:
                rough.append(name)  # a kink or a discrete choice between the steps: try another direction
                continue
            found.append((_compare(analytic, scale, fd1),
                          f"d<out, c>/d{name} along a random direction {what}: backward {analytic:.6e}, "
                          f"finite difference {fd1:.6e}"))
        pending = rough
    return found, [f"{name} {what}".strip() for name in pending]


def _parameter_findings(subject: Subject, module, q, k, v, cotangent, dtype, salt: str) -> "list[Finding]":
    """The same comparison for one random direction over every trainable parameter at once."""
    params = trainable_parameters(module)
    if not params:
        return []
    eps, tol = STEP[dtype], TOLERANCE[dtype]
    out = subject.run(module, q, k, v)
    grads = vjp(out, params, cotangent)
    for attempt in range(ATTEMPTS):
        directions = {n: subject.randn(tuple(p.shape), p.dtype, f"{salt}:param:{n}:{attempt}")
                      for n, p in params.items()}
        saved = {n: p.detach().clone() for n, p in params.items()}
        values = {}
        try:
            with torch.no_grad():
                for step in (eps, -eps, 2 * eps, -2 * eps):
                    for n, p in params.items():
                        p.copy_(saved[n] + step * directions[n])
                    values[step] = _value(subject.run(module, q, k, v), cotangent)
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(saved[n])
        fd1 = (values[eps] - values[-eps]) / (2 * eps)
        fd2 = (values[2 * eps] - values[-2 * eps]) / (4 * eps)
        pairs = [(grads[n], directions[n]) for n in params if grads[n] is not None]
        analytic = sum(float((g.to(torch.float64) * d.to(torch.float64)).sum()) for g, d in pairs)
        scale = sum(float((g.to(torch.float64) * d.to(torch.float64)).abs().sum()) for g, d in pairs)
        if _compare(fd1, scale, fd2) > tol:
            continue
        return [(_compare(analytic, scale, fd1), f"d<out, c>/d(parameters) along a random direction: backward "
                                                 f"{analytic:.6e}, finite difference {fd1:.6e}")]
    return []


def check_gradients(subject: Subject) -> CheckOutcome:
    """Backward agrees with finite differences of forward (q, k, v with and without padding; parameters)."""
    structural, note = subject.structural()
    dtype = torch.float64 if structural == torch.float64 else torch.float32
    shape = subject.main
    module = subject.module_for(shape, dtype)
    q, k, v = subject.inputs(shape, dtype, "gradients")
    cotangent = subject.randn((shape.batch, shape.heads, shape.lq, shape.head_dim), dtype, "gradients:dout")
    found, rough = _input_findings(subject, module, q, k, v, None, cotangent, dtype, "gradients", "")
    mask = left_and_interior(shape, subject.device)
    pq, pk, pv = padded_inputs(subject, shape, dtype, mask, "gradients:padded", "gradients:garbage")
    more, rough_padded = _input_findings(subject, module, pq, pk, pv, mask, cotangent, dtype, "gradients:padded",
                                         "with left/interior padding")
    found += more + _parameter_findings(subject, module, q, k, v, cotangent, dtype, "gradients")
    rough += rough_padded
    extra = f"non-smooth in every direction tried: {', '.join(rough)}" if rough else ""
    if dtype != torch.float64:
        extra = "; ".join(x for x in (note, "float32 differences (coarse: gross errors only)", extra) if x)
    if not found:
        return CheckOutcome("gradients", Status.OK, message=f"not compared: {extra or 'no gradient'}")
    return judged("gradients", found, TOLERANCE[dtype], dtype_name(dtype), extra)
