"""The `decode` check (CAB's incremental test): decoding one token at a time reproduces the full forward.

For attentions that provide `decode_init` / `decode_step`, on the causal patterns. CS: from an empty
state and from a state prefilled with the first half of the sequence (with a padded context token on one
batch row), every decoded row equals the same row of forward(). CC: with the whole (partly padded) memory
given to decode_init, every query decoded alone equals its row of forward(). Both also run with grouped
key/value heads when the attention supports them, and stepping twice from one state must give the same
output (the contract lets a benchmark time one step repeatedly). Comparisons are relative to the output
scale, in the structural dtype, with the structural tolerance.
"""

from __future__ import annotations

import dataclasses

import torch

from cab.check.compare import (
    HALF_L2_TOLERANCE,
    HALF_PRECISION,
    max_abs,
    relative_error,
    relative_l2,
    structural_tolerance,
)
from cab.check.outcomes import CheckOutcome, Finding, judged
from cab.check.subject import Shape, Subject, dtype_name
from cab.patterns import Pattern


def _rows(x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    return x[..., start:stop, :].contiguous()


def _padding(shape: Shape, upto: int, device: torch.device) -> "torch.Tensor | None":
    """(B, Lk) with the first `upto` keys of the last batch row padded (None when nothing is padded)."""
    if upto <= 0 or shape.batch < 2:
        return None
    mask = torch.zeros(shape.batch, shape.lk, dtype=torch.bool, device=device)
    mask[-1, :upto] = True
    return mask


def _forward(subject: Subject, truth, q, k, v, padding) -> torch.Tensor:
    """forward() of the `truth` module (the structural dtype's) on the inputs cast to that dtype."""
    dtype = subject.structural()[0]
    return subject.run(truth, q.to(dtype), k.to(dtype), v.to(dtype), key_padding_mask=padding)


def self_decode_errors(subject: Subject, module, shape: Shape, prefill: int, salt: str,
                       dtype: "torch.dtype | None" = None, truth=None, pairs: "list | None" = None) -> "list[Finding]":
    """CS: rows prefill..L-1 decoded one by one after prefilling [:prefill] vs forward() (of `truth`, the
    module in the structural dtype, when decoding runs in another dtype)."""
    q, k, v = subject.inputs(shape, dtype or subject.structural()[0], salt)
    padding = _padding(shape, min(2, prefill), q.device)
    full = subject.run(module, q, k, v, key_padding_mask=padding) if truth is None else \
        _forward(subject, truth, q, k, v, padding)
    scale = max_abs(full)
    subject.reseed()
    state = module.decode_init(_rows(k, 0, prefill), _rows(v, 0, prefill),
                               key_padding_mask=None if padding is None else padding[:, :prefill],
                               capacity=shape.lq)
    found = []
    for t in range(prefill, shape.lq):
        step = (_rows(q, t, t + 1), _rows(k, t, t + 1), _rows(v, t, t + 1))
        out, next_state = module.decode_step(state, *step)
        again, next_state = module.decode_step(state, *step)
        where = f"{shape.describe()}, prefill {prefill}"
        found.append((relative_error(out[..., 0, :], full[..., t, :], scale), f"row {t} decoded ({where})"))
        if pairs is not None:
            pairs.append((out[..., 0, :], full[..., t, :]))
        found.append((relative_error(again, out, scale), f"row {t} stepped twice from one state ({where})"))
        state = next_state
    return found


def cross_decode_errors(subject: Subject, module, shape: Shape, salt: str, dtype: "torch.dtype | None" = None,
                        truth=None, pairs: "list | None" = None) -> "list[Finding]":
    """CC: every query decoded alone against the whole memory vs forward() (of `truth`, see above)."""
    q, k, v = subject.inputs(shape, dtype or subject.structural()[0], salt)
    padding = _padding(shape, max(1, shape.lk // 4), q.device)
    full = subject.run(module, q, k, v, key_padding_mask=padding) if truth is None else \
        _forward(subject, truth, q, k, v, padding)
    scale = max_abs(full)
    subject.reseed()
    state = module.decode_init(k, v, key_padding_mask=padding)
    found = []
    for t in range(shape.lq):
        out, state_after = module.decode_step(state, _rows(q, t, t + 1))
        again, _ = module.decode_step(state, _rows(q, t, t + 1))
        found.append((relative_error(out[..., 0, :], full[..., t, :], scale),
                      f"query {t} decoded ({shape.describe()})"))
        if pairs is not None:
            pairs.append((out[..., 0, :], full[..., t, :]))
        found.append((relative_error(again, out, scale), f"query {t} stepped twice ({shape.describe()})"))
        state = state_after
    return found


def check_decode(subject: Subject, dtype: "torch.dtype | None" = None) -> CheckOutcome:
    """Token-by-token decoding reproduces forward() on the subject's causal pattern (in a dtype other than the
    structural one, decoding in that dtype is compared with forward() in the structural dtype)."""
    structural, note = subject.structural()
    dtype = dtype or structural
    if dtype != structural:
        note = f"decoded in {dtype_name(dtype)}, forward() in {dtype_name(structural)}"
    main = subject.main
    shapes = [main]
    if subject.spec.supports_gqa and main.heads % 2 == 0:
        shapes.append(dataclasses.replace(main, kv_heads=main.heads // 2, label="gqa"))
    found: list[Finding] = []
    half = dtype in HALF_PRECISION and dtype != structural
    pairs: "list | None" = [] if half else None
    with torch.no_grad():
        for shape in shapes:
            module = subject.module(shape.head_dim, dtype)
            truth = None if dtype == structural else subject.truth_for(shape, dtype, structural)
            if subject.pattern is Pattern.CS:
                for prefill in (0, shape.lq // 2):
                    found += self_decode_errors(subject, module, shape, prefill, f"decode:{shape.label}:{prefill}",
                                                dtype, truth, pairs)
            else:
                found += cross_decode_errors(subject, module, shape, f"decode:{shape.label}", dtype, truth, pairs)
    tolerance = structural_tolerance(dtype)
    # stepping twice repeats one computation: held strictly, and named first when it fails, since a step that
    # changes its state corrupts every row decoded after it
    twice = [f for f in found if "twice" in f[1]]
    if twice and not max(e for e, _ in twice) <= tolerance:
        return judged("decode", twice, tolerance, dtype_name(dtype), note)
    if half:  # decoded rows vs forward(): relative L2
        decoded = torch.cat([a.reshape(-1) for a, _ in pairs]), torch.cat([e.reshape(-1) for _, e in pairs])
        return judged("decode", [(relative_l2(*decoded), "rows decoded vs forward()")], HALF_L2_TOLERANCE,
                      dtype_name(dtype), note + "; relative L2, a content-based choice may flip in half precision",
                      kind="relative L2")
    return judged("decode", found, tolerance, dtype_name(dtype), note)
