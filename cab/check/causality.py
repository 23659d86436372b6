"""Causality checks: no output row may depend on anything after it.

CS (`causal_prefix`, `causal_grad`): row i equals the row computed on the prefix [:i+1] of q, k and v, and
its gradient with respect to every later row of q, k and v is zero. CC (`query_causal`): row i is
unchanged when the queries after i are removed or perturbed (keys and values fixed), and its gradient with
respect to every later query row is zero. Comparisons are relative to the output (or gradient) scale; the
perturbation probes measure each row against its own scale (`rowwise_error`), so a leak into the small
outputs of rows that average many keys is not diluted by the largest row.

In the structural dtype (float64 when the attention runs in it) every row is checked; in the requested
dtype a sample of SAMPLED_ROWS rows (one just past 512 and the last ones when the length allows). The
perturbation and gradient probes run one copy of the input per row, stacked along the batch.
"""

from __future__ import annotations

import math

import torch

from cab.check.compare import max_abs, relative_error, structural_tolerance
from cab.check.gradients import vjp
from cab.check.outcomes import CheckOutcome, Finding, judged
from cab.check.subject import Shape, Subject, dtype_name, rows_after, sample_splits
from cab.patterns import Pattern
from cab.status import Status

SAMPLED_ROWS = 12  # rows probed in a dtype other than the structural one


def _rows(x: torch.Tensor, stop: int) -> torch.Tensor:
    """The first `stop` rows (sequence dim -2) as a contiguous tensor."""
    return x[..., :stop, :].contiguous()


def prefix_errors(subject: Subject, module, q, k, v, full: torch.Tensor, rows: "list[int]") -> "list[Finding]":
    """CS: for each row i in `rows`, row i of the full output vs the last row of the output on q, k, v [:i+1]."""
    scale = max_abs(full)
    found = []
    for i in rows:
        part = subject.run(module, _rows(q, i + 1), _rows(k, i + 1), _rows(v, i + 1))
        found.append((relative_error(part[..., i, :], full[..., i, :], scale), f"row {i} vs its prefix [:{i + 1}]"))
    return found


def query_removal_errors(subject: Subject, module, q, k, v, full: torch.Tensor, rows: "list[int]",
                         ) -> "list[Finding]":
    """CC: for each row i in `rows`, row i of the full output vs the output on q[:i+1] with all keys."""
    scale = max_abs(full)
    found = []
    for i in rows:
        part = subject.run(module, _rows(q, i + 1), k, v)
        found.append((relative_error(part[..., i, :], full[..., i, :], scale),
                      f"row {i} with the queries after it removed"))
    return found


def perturbed_names(pattern: Pattern) -> str:
    """The inputs whose later rows a causal pattern must ignore: q, k and v for CS, the queries for CC."""
    return "qkv" if pattern is Pattern.CS else "q"


def perturbed_copies(subject: Subject, q, k, v, splits: "list[int]", salt: str,
                     key_padding_mask: "torch.Tensor | None" = None) -> "list[tuple]":
    """(q, k, v, mask) per split i with the rows after i replaced by other values: the queries for CC; the
    queries, keys and values for CS."""
    names = perturbed_names(subject.pattern)
    tensors = {"q": q, "k": k, "v": v}
    others = {n: subject.randn(tuple(tensors[n].shape), tensors[n].dtype, f"{salt}:{n}") for n in names}
    copies = []
    for i in splits:
        swapped = {n: rows_after(tensors[n], i, others[n]) for n in names}
        copies.append(tuple(swapped.get(n, tensors[n]) for n in "qkv") + (key_padding_mask,))
    return copies


def perturbation_findings(subject: Subject, outs: "list[torch.Tensor]", full: torch.Tensor, splits: "list[int]",
                          ) -> "list[Finding]":
    """Rows <= i of each perturbed copy's output vs the unperturbed `full` output, each row on its own scale."""
    scale = max_abs(full)
    touched = "queries, keys and values" if perturbed_names(subject.pattern) == "qkv" else "queries"
    return [(rowwise_error(out[..., : i + 1, :], full[..., : i + 1, :], scale),
             f"rows <= {i} with the {touched} after {i} perturbed") for i, out in zip(splits, outs)]


def perturbation_errors(subject: Subject, module, q, k, v, full: torch.Tensor, splits: "list[int]", salt: str,
                        key_padding_mask: "torch.Tensor | None" = None) -> "list[Finding]":
    """For every split i, rows <= i must not change when the rows after i are replaced by other values (the
    queries for CC; the queries, keys and values for CS). The perturbed copies run stacked along the batch."""
    outs = subject.run_copies(module, perturbed_copies(subject, q, k, v, splits, salt, key_padding_mask))
    return perturbation_findings(subject, outs, full, splits)


ROW_FLOOR = 1e-2  # a row's own scale counts down to this fraction of the whole output's


def rowwise_error(actual: torch.Tensor, expected: torch.Tensor, scale: float) -> float:
    """max over rows of |actual - expected| / that row's own scale (max |expected| over its features, at
    least ROW_FLOOR x `scale`): a leak into rows whose outputs are small (long averages) is not diluted by
    the largest row, while a row near zero cannot turn round-off into an error."""
    a, e = actual.detach().to(torch.float64), expected.detach().to(torch.float64)
    if not bool(torch.isfinite(a).all() and torch.isfinite(e).all()) or not math.isfinite(scale):
        return math.inf
    rows = e.abs().amax(dim=-1).clamp_min(max(ROW_FLOOR * scale, torch.finfo(torch.float64).tiny))
    return float(((a - e).abs().amax(dim=-1) / rows).max()) if a.numel() else 0.0


def gradient_leaks(subject: Subject, module, q, k, v, inputs: "tuple[str, ...]", rows: "list[int]", salt: str,
                   ) -> "list[Finding]":
    """For each row i in `rows`, max |d out[i] / d x[j]| over j > i relative to the max over j <= i, x in
    `inputs` (names among "q", "k", "v"), with a random cotangent on row i alone. One copy of the inputs per
    row, stacked along the batch, so one backward serves every row."""
    tensors = {"q": q.detach(), "k": k.detach(), "v": v.detach()}
    leaves = [{n: tensors[n].clone().requires_grad_() for n in inputs} for _ in rows]
    copies = [tuple(leaf.get(n, tensors[n]) for n in "qkv") + (None,) for leaf in leaves]
    outs = subject.run_copies(module, copies)
    if not outs or not outs[0].requires_grad:
        return []
    cotangent_rows = subject.randn(tuple(outs[0].shape), outs[0].dtype, f"{salt}:dout")
    cotangents = []
    for i in rows:
        cotangent = torch.zeros_like(cotangent_rows)
        cotangent[..., i, :] = cotangent_rows[..., i, :]
        cotangents.append(cotangent)
    flat = {f"{c}:{n}": leaf[n] for c, leaf in enumerate(leaves) for n in inputs}
    grads = vjp(torch.cat(outs), flat, torch.cat(cotangents))
    found = []
    for c, i in enumerate(rows):
        present = {n: grads[f"{c}:{n}"] for n in inputs if grads[f"{c}:{n}"] is not None}
        own = max((max_abs(g[..., : i + 1, :]) for g in present.values()), default=0.0)
        for name, g in present.items():
            leak = max_abs(g[..., i + 1:, :])
            error = leak / own if own > 0 else (0.0 if leak == 0 else float("inf"))
            found.append((error, f"d out[{i}] / d {name}[{i + 1}:] vs d out[{i}] / d {name}[:{i + 1}]"))
    return found


def _setup(subject: Subject, dtype: "torch.dtype | None", salt: str, shape: "Shape | None" = None):
    structural, note = subject.structural()
    dtype = dtype or structural
    shape = shape or subject.main
    module = subject.module_for(shape, dtype)
    q, k, v = subject.inputs(shape, dtype, salt)
    return dtype, (note if dtype == structural else ""), module, q, k, v


def _every_row_or_sample(subject: Subject, dtype: torch.dtype, length: int) -> "list[int]":
    """Rows 0..length-1 in the structural dtype, else a sample of them."""
    if dtype == subject.structural()[0]:
        return list(range(length))
    return sample_splits(length + 1, SAMPLED_ROWS)


def _verdict(name: str, found: "list[Finding]", dtype: torch.dtype, note: str) -> CheckOutcome:
    return judged(name, found, structural_tolerance(dtype), dtype_name(dtype), note)


def check_causal_prefix(subject: Subject, dtype: "torch.dtype | None" = None) -> CheckOutcome:
    """CS: output rows equal the output computed on each row's prefix (every row in the structural dtype)."""
    dtype, note, module, q, k, v = _setup(subject, dtype, "causal_prefix")
    with torch.no_grad():
        full = subject.run(module, q, k, v)
        found = prefix_errors(subject, module, q, k, v, full, _every_row_or_sample(subject, dtype, q.shape[-2]))
    return _verdict("causal_prefix", found, dtype, note)


def check_causal_grad(subject: Subject, dtype: "torch.dtype | None" = None) -> CheckOutcome:
    """CS: the gradient of every output row with respect to every later row of q, k and v is zero."""
    dtype, note, module, q, k, v = _setup(subject, dtype, "causal_grad")
    rows = _every_row_or_sample(subject, dtype, q.shape[-2] - 1)
    found = gradient_leaks(subject, module, q, k, v, ("q", "k", "v"), rows, "causal_grad")
    if not found:
        return CheckOutcome("causal_grad", Status.SKIPPED, message="the output has no gradient (see backward)")
    return _verdict("causal_grad", found, dtype, note)


def check_query_causal(subject: Subject, dtype: "torch.dtype | None" = None) -> CheckOutcome:
    """CC: output rows are unchanged when the later queries are removed or perturbed, and their gradient with
    respect to every later query row is zero."""
    dtype, note, module, q, k, v = _setup(subject, dtype, "query_causal")
    length = q.shape[-2]
    with torch.no_grad():
        full = subject.run(module, q, k, v)
        found = query_removal_errors(subject, module, q, k, v, full, _every_row_or_sample(subject, dtype, length))
        found += perturbation_errors(subject, module, q, k, v, full, _every_row_or_sample(subject, dtype, length - 1),
                                     "query_causal:other")
    found += gradient_leaks(subject, module, q, k, v, ("q",), _every_row_or_sample(subject, dtype, length - 1),
                            "query_causal")
    return _verdict("query_causal", found, dtype, note)


def future_independence(subject: Subject, shape: Shape, dtype: "torch.dtype | None" = None,
                        splits: "list[int] | None" = None) -> CheckOutcome:
    """CS or CC on an arbitrary shape: rows up to each split unchanged when everything after it is perturbed
    (every split unless `splits` is given; the copies run batched)."""
    dtype, note, module, q, k, v = _setup(subject, dtype, f"{shape.label}:causal", shape)
    splits = list(range(shape.lq - 1)) if splits is None else splits
    with torch.no_grad():
        full = subject.run(module, q, k, v)
        found = perturbation_errors(subject, module, q, k, v, full, splits, f"{shape.label}:causal:other")
    return _verdict("causality", found, dtype, note)
