"""`key_padding`: padded keys are invisible, wherever they are, in outputs and in gradients.

- right padding: each batch element, padded by a different number of keys holding large garbage, matches
  the same element run alone, unpadded and without a mask;
- left and interior padding: real rows do not change when the padded positions hold other garbage (so a
  mask turned into lengths, which assumes right padding, is caught);
- rows that see no key (a fully padded element; under CS the rows before the first real key of a
  left-padded element) output finite zeros, with finite gradients;
- no gradient reaches a padded key or value.

For self patterns the queries grow with the keys (padded query rows hold garbage too and their outputs are
ignored unless they see no key); for cross patterns only the keys and values are padded. Runs in each check
dtype with that dtype's tolerance.
"""

from __future__ import annotations

import torch

from cab.check.basic import nonfinite_summary
from cab.check.compare import max_abs, relative_error, structural_tolerance
from cab.check.gradients import vjp
from cab.check.outcomes import CheckOutcome, Finding, judged
from cab.check.subject import Shape, Subject, dtype_name
from cab.patterns import Pattern

PADDED_KEYS = (5, 13)  # right padding per batch element of the main shape
GARBAGE_SCALE = 10.0  # padded positions hold N(0, 10^2) values: an unmasked one visibly moves the output


def left_and_interior(shape: Shape, device: torch.device) -> torch.Tensor:
    """(B, Lk) masks: element 0 padded on the left (a sixth of the keys), element 1 in the interior (a
    stretch from a fifth to two fifths), further elements alternating."""
    mask = torch.zeros(shape.batch, shape.lk, dtype=torch.bool, device=device)
    for b in range(shape.batch):
        if b % 2 == 0:
            mask[b, : max(1, shape.lk // 6)] = True
        else:
            mask[b, shape.lk // 5: max(shape.lk // 5 + 1, 2 * shape.lk // 5)] = True
    return mask


def _rows_of(mask: torch.Tensor) -> torch.Tensor:
    return mask[:, None, :, None]  # (B, 1, L, 1) over the sequence dim


def _garbage(subject: Subject, x: torch.Tensor, rows: torch.Tensor, salt: str) -> torch.Tensor:
    noise = subject.randn(tuple(x.shape), x.dtype, salt, scale=GARBAGE_SCALE)
    return torch.where(rows, noise, x)


def padded_inputs(subject: Subject, shape: Shape, dtype: torch.dtype, mask: torch.Tensor, salt: str,
                  garbage_salt: str) -> "tuple[torch.Tensor, torch.Tensor, torch.Tensor]":
    """q, k, v of `shape` with garbage at the padded positions (the queries too for self patterns)."""
    q, k, v = subject.inputs(shape, dtype, salt)
    rows = _rows_of(mask)
    k, v = _garbage(subject, k, rows, f"{garbage_salt}:k"), _garbage(subject, v, rows, f"{garbage_salt}:v")
    if not subject.pattern.cross:
        q = _garbage(subject, q, rows, f"{garbage_salt}:q")
    return q, k, v


def empty_rows(pattern: Pattern, mask: torch.Tensor, lq: int) -> torch.Tensor:
    """(B, Lq) bool: the query rows that see no key under `pattern` with key padding `mask`."""
    lk = mask.shape[1]
    real = ~mask
    if pattern is Pattern.CS:
        visible = torch.arange(lk, device=mask.device)[None, :] <= (torch.arange(lq, device=mask.device)
                                                                     + lk - lq)[:, None]
        return ~(visible[None] & real[:, None, :]).any(dim=-1)
    return (~real.any(dim=-1))[:, None].expand(mask.shape[0], lq)


def right_padded(subject: Subject, shape: Shape, dtype: torch.dtype, salt: str, pads: "tuple[int, ...]"):
    """(q, k, v, mask): element b padded by pads[b] garbage keys at the end."""
    real = [shape.lk - pad for pad in pads]
    mask = torch.arange(shape.lk, device=subject.device)[None, :] >= torch.tensor(real, device=subject.device)[:, None]
    return (*padded_inputs(subject, shape, dtype, mask, salt, f"{salt}:garbage"), mask)


def alone_errors(subject: Subject, module, shape: Shape, padded: tuple, out: torch.Tensor,
                 pads: "tuple[int, ...]") -> "list[Finding]":
    """Each element of a right-`padded` call's output `out` vs the element run alone, unpadded, unmasked."""
    q, k, v, _ = padded
    found = []
    for b, pad in enumerate(pads):
        n = shape.lk - pad
        lq = shape.lq if subject.pattern.cross else n
        alone = subject.run(module, q[b:b + 1, :, :lq].contiguous(), k[b:b + 1, :, :n].contiguous(),
                            v[b:b + 1, :, :n].contiguous())
        found.append((relative_error(out[b:b + 1, :, :lq], alone),
                      f"batch element {b} with {pad} padded keys vs the element alone unpadded"))
    return found


def right_padding_errors(subject: Subject, module, shape: Shape, dtype: torch.dtype, salt: str,
                         pads: "tuple[int, ...]") -> "list[Finding]":
    """Each element, padded by pads[b] garbage keys at the end, vs the element alone without padding."""
    padded = right_padded(subject, shape, dtype, salt, pads)
    out = subject.run(module, *padded[:3], key_padding_mask=padded[3])
    return alone_errors(subject, module, shape, padded, out, pads)


def garbage_pair(subject: Subject, shape: Shape, dtype: torch.dtype, mask: torch.Tensor, salt: str) -> "list[tuple]":
    """Two (q, k, v, mask) with the same real values and different garbage at the positions `mask` pads."""
    return [(*padded_inputs(subject, shape, dtype, mask, salt, f"{salt}:garbage:{x}"), mask) for x in "ab"]


def garbage_finding(subject: Subject, shape: Shape, mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                    what: str) -> Finding:
    """The real rows of the outputs `a` and `b` of a garbage pair, compared."""
    rows = torch.ones(shape.batch, shape.lq, dtype=torch.bool, device=mask.device)
    if not subject.pattern.cross:
        rows = ~mask[:, : shape.lq]
    keep = rows[:, None, :, None]
    scale = max_abs(a.masked_fill(~keep, 0.0))
    return relative_error(b.masked_fill(~keep, 0.0), a.masked_fill(~keep, 0.0), scale), \
        f"real rows with other garbage at the {what}"


def garbage_errors(subject: Subject, module, shape: Shape, dtype: torch.dtype, mask: torch.Tensor, salt: str,
                   what: str) -> "list[Finding]":
    """Real rows with the padded positions holding one garbage vs another (one batched call)."""
    a, b = subject.run_copies(module, garbage_pair(subject, shape, dtype, mask, salt))
    return [garbage_finding(subject, shape, mask, a, b, what)]


def empty_row_findings(subject: Subject, module, shape: Shape, dtype: torch.dtype, mask: torch.Tensor,
                       salt: str) -> "tuple[list[Finding], str]":
    """Rows that see no key must be finite zeros with finite gradients; no gradient may reach a padded key
    or value. Returns the findings and a description of any non-finite values."""
    q, k, v = padded_inputs(subject, shape, dtype, mask, salt, f"{salt}:garbage")
    leaves = {n: t.detach().requires_grad_() for n, t in zip("qkv", (q, k, v))}
    out = subject.run(module, leaves["q"], leaves["k"], leaves["v"], key_padding_mask=mask)
    found: list[Finding] = []
    empty = empty_rows(subject.pattern, mask, shape.lq)[:, None, :, None]
    scale = max_abs(out.masked_fill(empty, 0.0))
    if bool(empty.any()):
        found.append((max_abs(out.masked_fill(~empty, 0.0)) / max(scale, 1e-300),
                      f"rows that see no key ({int(empty.sum())} of them) must output zeros"))
    bad, where = nonfinite_summary({"output": out})
    if not out.requires_grad:
        return found, where
    cotangent = subject.randn(tuple(out.shape), dtype, f"{salt}:dout")
    grads = vjp(out, leaves, cotangent)
    present = {n: g for n, g in grads.items() if g is not None}
    bad_g, where_g = nonfinite_summary(present)
    if bad_g:
        where = ", ".join(w for w in (where, where_g) if w)
    padded = _rows_of(mask)
    for name in ("k", "v"):
        g = present.get(name)
        if g is None:
            continue
        own = max_abs(g.masked_fill(padded, 0.0))
        leak = max_abs(g.masked_fill(~padded, 0.0))
        found.append((leak / own if own > 0 else (0.0 if leak == 0 else float("inf")),
                      f"gradient reaching padded {'keys' if name == 'k' else 'values'}"))
    return found, where


def fully_padded(shape: Shape, device: torch.device) -> torch.Tensor:
    """Element 0 right-padded by a quarter of the keys, every other element fully padded."""
    mask = torch.ones(shape.batch, shape.lk, dtype=torch.bool, device=device)
    mask[0, : shape.lk - shape.lk // 4] = False
    return mask


def padding_findings(subject: Subject, module, shape: Shape, dtype: torch.dtype, salt: str,
                     pads: "tuple[int, ...] | None" = None) -> "tuple[list[Finding], str]":
    """Every padding finding on `shape` (see the module docstring) and a description of non-finite values."""
    found: list[Finding] = []
    with torch.no_grad():
        if pads is not None:
            found += right_padding_errors(subject, module, shape, dtype, f"{salt}:right", pads)
        found += garbage_errors(subject, module, shape, dtype, left_and_interior(shape, subject.device),
                                f"{salt}:inner", "left and interior padded positions")
    more, where = empty_row_findings(subject, module, shape, dtype, left_and_interior(shape, subject.device),
                                     f"{salt}:grad")
    found += more
    if shape.batch >= 2:
        more, where_full = empty_row_findings(subject, module, shape, dtype, fully_padded(shape, subject.device),
                                              f"{salt}:empty")
        found += more
        where = ", ".join(w for w in (where, where_full) if w)
    if where:
        found.append((float("inf"), f"non-finite values with padding ({where})"))
    return found, where


def check_key_padding(subject: Subject, dtype: "torch.dtype | None" = None) -> CheckOutcome:
    """Padding anywhere leaves real rows and their gradients alone; rows seeing no key are finite zeros."""
    structural, note = subject.structural()
    dtype = dtype or structural
    shape = subject.main
    if shape.batch != len(PADDED_KEYS):
        raise ValueError(f"key_padding needs a batch of {len(PADDED_KEYS)}, the main shape has {shape.batch}")
    module = subject.module_for(shape, dtype)
    found, _ = padding_findings(subject, module, shape, dtype, "key_padding", PADDED_KEYS)
    return judged("key_padding", found, structural_tolerance(dtype), dtype_name(dtype),
                  note if dtype == structural else "")
