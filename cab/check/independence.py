"""`determinism` and `independence`: the properties every other check relies on, checked first so that an
attention that breaks them is named for what it does rather than for the check it then trips.

determinism (requested dtype, eval mode; non-finite values compare equal when they sit in the same places,
the `finite` check having judged them): two calls on the same inputs after the same reseed agree; the
inputs are unchanged after a call; the output does not share memory with an input; an output is not
overwritten by the next call (a reused buffer). Whether the output also changes between calls *without* a
reseed (sampling, or dropout left on) is recorded on the subject, so a later failure can say so.

independence (each check dtype): every batch element equals itself computed alone, with and without a key
padding mask, and perturbing one head's inputs leaves the other heads' outputs unchanged (unless the
attention declares `mixes_heads`: heads that read each other by design).
"""

from __future__ import annotations

import torch

from cab.check.compare import consistent_error, structural_tolerance
from cab.check.outcomes import CheckOutcome, Finding, judged
from cab.check.subject import Subject, dtype_name
from cab.status import Status

PADDED_KEYS = (5, 13)  # per batch element of the main shape, for the masked comparison


def _shares_memory(out: torch.Tensor, inputs: "dict[str, torch.Tensor]") -> "list[str]":
    storage = out.untyped_storage().data_ptr()
    return [n for n, t in inputs.items() if t.untyped_storage().data_ptr() == storage]


def check_determinism(subject: Subject) -> CheckOutcome:
    """Same inputs and reseed give the same output; inputs untouched; no aliasing; no reused output buffer."""
    dtype, shape = subject.dtype, subject.main
    module = subject.module_for(shape, dtype)
    was_training = module.training
    module.eval()
    try:
        q, k, v = subject.inputs(shape, dtype, "determinism")
        real = [shape.lk - pad for pad in PADDED_KEYS[: shape.batch]]
        mask = torch.arange(shape.lk, device=q.device)[None, :] >= torch.tensor(real, device=q.device)[:, None]
        snapshot = {"q": q.clone(), "k": k.clone(), "v": v.clone(), "key_padding_mask": mask.clone()}
        problems = []
        with torch.no_grad():
            first = subject.run(module, q, k, v)
            masked = subject.run(module, q, k, v, key_padding_mask=mask)
            current = {"q": q, "k": k, "v": v, "key_padding_mask": mask}
            mutated = [n for n in snapshot if not torch.equal(snapshot[n], current[n])]
            if mutated:
                problems.append(f"forward modified its input(s) in place: {', '.join(mutated)} (the caller's "
                                f"tensors must be left as they were)")
            aliased = sorted(set(_shares_memory(first, {"q": q, "k": k, "v": v})
                                 + _shares_memory(masked, {"q": q, "k": k, "v": v})))
            if aliased:
                problems.append(f"the output shares memory with the input(s) {', '.join(aliased)}")
            kept = first.clone()
            q2, k2, v2 = subject.inputs(shape, dtype, "determinism:other")
            subject.run(module, q2, k2, v2)
            if consistent_error(first, kept) != 0:
                problems.append("the output of one call was overwritten by the next call (a reused output buffer)")
            q, k, v = (snapshot[n].clone() for n in "qkv")
            again = subject.run(module, q, k, v)
            error = consistent_error(again, kept)
            if not error <= structural_tolerance(dtype):
                problems.append(f"two calls on the same inputs after the same reseed differ (relative error "
                                f"{error:.2e}): the output depends on something other than the inputs, "
                                f"the parameters and the seeded generator")
            unseeded = module(q, k, v)  # no reseed: the generator has moved on
            drift = consistent_error(unseeded, kept)
            if drift > structural_tolerance(dtype):
                subject.stochastic = (f"in eval mode the output changes from call to call when the generator is "
                                      f"not reseeded (relative change {drift:.2e}: sampling, or dropout left on)")
    finally:
        module.train(was_training)
    if problems:
        return CheckOutcome("determinism", Status.INCORRECT, message="; ".join(problems) + f" ({dtype_name(dtype)})")
    note = f"; {subject.stochastic}" if subject.stochastic else ""
    return CheckOutcome("determinism", Status.OK, 0.0, 0.0,
                        f"repeatable, inputs untouched, no aliasing or reused output ({dtype_name(dtype)}){note}")


def batch_errors(subject: Subject, module, q, k, v, mask: "torch.Tensor | None", what: str) -> "list[Finding]":
    """Each batch element of one call vs that element run alone (with its own mask row)."""
    out = subject.run(module, q, k, v, key_padding_mask=mask)
    found = []
    for b in range(q.shape[0]):
        alone = subject.run(module, q[b:b + 1], k[b:b + 1], v[b:b + 1],
                            key_padding_mask=None if mask is None else mask[b:b + 1])
        found.append((consistent_error(out[b:b + 1], alone), f"batch element {b} {what} vs the element alone"))
    return found


def head_errors(subject: Subject, module, q, k, v, salt: str) -> "list[Finding]":
    """With query head 0 and key/value head 0 replaced by other values, the other heads' outputs (those that
    do not read key/value head 0) must not change."""
    hq, hkv = q.shape[1], k.shape[1]
    group = hq // hkv
    if hkv < 2:
        return []
    others = {n: subject.randn(tuple(t.shape), t.dtype, f"{salt}:{n}") for n, t in zip("qkv", (q, k, v))}
    swapped = []
    for name, t in zip("qkv", (q, k, v)):
        t = t.clone()
        t[:, 0] = others[name][:, 0]
        swapped.append(t)
    base, moved = subject.run_copies(module, [(q, k, v, None), (*swapped, None)])
    return [(consistent_error(moved[:, group:], base[:, group:]),
             f"heads {group}..{hq - 1} with the inputs of head 0 perturbed")]


def check_independence(subject: Subject, dtype: "torch.dtype | None" = None) -> CheckOutcome:
    """Batch elements (with and without a mask) and heads are computed independently."""
    structural, note = subject.structural()
    dtype = dtype or structural
    shape = subject.main
    module = subject.module_for(shape, dtype)
    q, k, v = subject.inputs(shape, dtype, "independence")
    real = [shape.lk - pad for pad in PADDED_KEYS[: shape.batch]]
    mask = torch.arange(shape.lk, device=q.device)[None, :] >= torch.tensor(real, device=q.device)[:, None]
    with torch.no_grad():
        found = batch_errors(subject, module, q, k, v, None, "without a mask")
        found += batch_errors(subject, module, q, k, v, mask, "with a key padding mask")
        batch_ok = max(e for e, _ in found) <= structural_tolerance(dtype)
        mixes = bool(getattr(subject.spec.cls, "mixes_heads", False))
        if batch_ok and not mixes:
            found += head_errors(subject, module, q, k, v, "independence:heads")
    outcome = judged("independence", found, structural_tolerance(dtype), dtype_name(dtype),
                     note if dtype == structural else "")
    if outcome.status is not Status.OK and subject.stochastic:
        return CheckOutcome(outcome.name, outcome.status, outcome.error, outcome.tolerance,
                            f"the output is random from call to call and its randomness depends on the batch "
                            f"({subject.stochastic}); {outcome.message}", outcome.kind)
    if mixes:
        return CheckOutcome(outcome.name, outcome.status, outcome.error, outcome.tolerance,
                            outcome.message + "; heads mix by design (mixes_heads), not compared", outcome.kind)
    return outcome
