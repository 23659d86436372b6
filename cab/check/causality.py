"""Causality checks: no output row may depend on anything after it.

CS (`causal_prefix`, `causal_grad`): row i equals the row computed on the prefix [:i+1] of q, k and v, and
its gradient with respect to every later row of q, k and v is zero. CC (`query_causal`): row i is
unchanged when the queries after i are removed or perturbed (keys and values fixed), and its gradient with
respect to every later query row is zero. Every row is checked, not a sample; comparisons are relative to
the output (or gradient) scale and run in the structural dtype (float64 when the attention supports it).
"""

from __future__ import annotations

import torch

from cab.check.compare import max_abs, relative_error, structural_tolerance
from cab.check.gradients import vjp
from cab.check.outcomes import CheckOutcome, Finding, judged
from cab.check.subject import Shape, Subject, dtype_name
from cab.patterns import Pattern
from cab.status import Status


def _rows(x: torch.Tensor, stop: int) -> torch.Tensor:
    """The first `stop` rows (sequence dim -2) as a contiguous tensor."""
    return x[..., :stop, :].contiguous()


def prefix_errors(subject: Subject, module, q, k, v, full: torch.Tensor) -> "list[Finding]":
    """CS: for every row i, row i of the full output vs the last row of the output on q, k, v [:i+1]."""
    scale = max_abs(full)
    found = []
    for i in range(q.shape[-2]):
        part = subject.run(module, _rows(q, i + 1), _rows(k, i + 1), _rows(v, i + 1))
        found.append((relative_error(part[..., i, :], full[..., i, :], scale), f"row {i} vs its prefix [:{i + 1}]"))
    return found


def query_removal_errors(subject: Subject, module, q, k, v, full: torch.Tensor) -> "list[Finding]":
    """CC: for every row i, row i of the full output vs the output on q[:i+1] with all keys and values."""
    scale = max_abs(full)
    found = []
    for i in range(q.shape[-2]):
        part = subject.run(module, _rows(q, i + 1), k, v)
        found.append((relative_error(part[..., i, :], full[..., i, :], scale),
                      f"row {i} with the queries after it removed"))
    return found


def perturbation_errors(subject: Subject, module, q, k, v, full: torch.Tensor, salt: str) -> "list[Finding]":
    """For every split i, rows <= i must not change when the rows after i are replaced by other values:
    the queries for CC, the queries, keys and values for CS."""
    scale = max_abs(full)
    names = "qkv" if subject.pattern is Pattern.CS else "q"
    touched = "queries, keys and values" if subject.pattern is Pattern.CS else "queries"
    tensors = {"q": q, "k": k, "v": v}
    others = {n: subject.randn(tuple(tensors[n].shape), tensors[n].dtype, f"{salt}:{n}") for n in names}
    found = []
    for i in range(q.shape[-2] - 1):
        swapped = {n: torch.cat([tensors[n][..., : i + 1, :], others[n][..., i + 1:, :]], dim=-2) for n in names}
        out = subject.run(module, *(swapped.get(n, tensors[n]) for n in "qkv"))
        found.append((relative_error(out[..., : i + 1, :], full[..., : i + 1, :], scale),
                      f"rows <= {i} with the {touched} after {i} perturbed"))
    return found


def gradient_leaks(subject: Subject, module, q, k, v, inputs: "tuple[str, ...]", salt: str) -> "list[Finding]":
    """For every row i, max |d out[i] / d x[j]| over j > i relative to max over j <= i, x in `inputs`
    (names among "q", "k", "v"), with a random cotangent on row i alone."""
    tensors = {"q": q, "k": k, "v": v}
    leaves = {name: tensors[name].detach().requires_grad_() for name in inputs}
    args = [leaves.get(name, tensors[name]) for name in "qkv"]
    out = subject.run(module, *args)
    cotangent_rows = subject.randn(tuple(out.shape), out.dtype, f"{salt}:dout")
    length = out.shape[-2]
    found = []
    for i in range(length - 1):
        cotangent = torch.zeros_like(cotangent_rows)
        cotangent[..., i, :] = cotangent_rows[..., i, :]
        grads = vjp(out, leaves, cotangent, retain_graph=True)
        present = {n: g for n, g in grads.items() if g is not None}
        own = max((max_abs(g[..., : i + 1, :]) for g in present.values()), default=0.0)
        for name, g in present.items():
            leak = max_abs(g[..., i + 1:, :])
            error = leak / own if own > 0 else (0.0 if leak == 0 else float("inf"))
            found.append((error, f"d out[{i}] / d {name}[{i + 1}:] vs d out[{i}] / d {name}[:{i + 1}]"))
    return found


def _structural_setup(subject: Subject, salt: str, shape: "Shape | None" = None):
    dtype, note = subject.structural()
    shape = shape or subject.main
    module = subject.module(shape.head_dim, dtype)
    q, k, v = subject.inputs(shape, dtype, salt)
    return dtype, note, module, q, k, v


def _verdict(name: str, found: "list[Finding]", dtype: torch.dtype, note: str) -> CheckOutcome:
    return judged(name, found, structural_tolerance(dtype), dtype_name(dtype), note)


def check_causal_prefix(subject: Subject) -> CheckOutcome:
    """CS: every output row equals the output computed on that row's prefix."""
    dtype, note, module, q, k, v = _structural_setup(subject, "causal_prefix")
    with torch.no_grad():
        full = subject.run(module, q, k, v)
        found = prefix_errors(subject, module, q, k, v, full)
    return _verdict("causal_prefix", found, dtype, note)


def check_causal_grad(subject: Subject) -> CheckOutcome:
    """CS: the gradient of every output row with respect to every later row of q, k and v is zero."""
    dtype, note, module, q, k, v = _structural_setup(subject, "causal_grad")
    found = gradient_leaks(subject, module, q, k, v, ("q", "k", "v"), "causal_grad")
    if not found:
        return CheckOutcome("causal_grad", Status.SKIPPED, message="the output has no gradient (see backward)")
    return _verdict("causal_grad", found, dtype, note)


def check_query_causal(subject: Subject) -> CheckOutcome:
    """CC: every output row is unchanged when the later queries are removed or perturbed, and its gradient
    with respect to every later query row is zero."""
    dtype, note, module, q, k, v = _structural_setup(subject, "query_causal")
    with torch.no_grad():
        full = subject.run(module, q, k, v)
        found = query_removal_errors(subject, module, q, k, v, full)
        found += perturbation_errors(subject, module, q, k, v, full, "query_causal:other")
    found += gradient_leaks(subject, module, q, k, v, ("q",), "query_causal")
    return _verdict("query_causal", found, dtype, note)


def future_independence(subject: Subject, shape: Shape) -> CheckOutcome:
    """CS or CC on an arbitrary shape: one forward per split, rows up to the split unchanged when
    everything after it is perturbed (the cheap causality probe of odd_shapes)."""
    dtype, note, module, q, k, v = _structural_setup(subject, f"{shape.label}:causal", shape)
    with torch.no_grad():
        full = subject.run(module, q, k, v)
        found = perturbation_errors(subject, module, q, k, v, full, f"{shape.label}:causal:other")
    return _verdict("causality", found, dtype, note)
