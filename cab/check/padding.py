"""`key_padding`: outputs at real query positions do not change when padded keys are appended.

Each batch element gets a different number of padded keys (filled with large garbage values) and is
compared with the same element run alone, unpadded and without a mask. For self patterns the queries grow
with the keys (padded query rows are garbage too and their outputs are ignored); for cross patterns only
the keys and values are padded.
"""

from __future__ import annotations

import torch

from cab.check.compare import relative_error, structural_tolerance
from cab.check.outcomes import CheckOutcome, Finding, judged
from cab.check.subject import Subject, dtype_name

PADDED_KEYS = (5, 13)  # per batch element of the main shape
GARBAGE_SCALE = 10.0  # padded positions hold N(0, 10^2) values: an unmasked one visibly moves the output


def check_key_padding(subject: Subject) -> CheckOutcome:
    """Batch elements padded by different amounts match each element run alone without padding."""
    dtype, note = subject.structural()
    shape = subject.main
    if shape.batch != len(PADDED_KEYS):
        raise ValueError(f"key_padding needs a batch of {len(PADDED_KEYS)}, the main shape has {shape.batch}")
    cross = subject.pattern.cross
    module = subject.module(shape.head_dim, dtype)
    q, k, v = subject.inputs(shape, dtype, "key_padding")
    real = [shape.lk - pad for pad in PADDED_KEYS]
    padding = torch.arange(shape.lk, device=q.device)[None, :] >= torch.tensor(real, device=q.device)[:, None]
    rows = padding[:, None, :, None]  # (B, 1, L, 1) over the sequence dim of k, v (and q for self patterns)

    def garbage(x: torch.Tensor, name: str) -> torch.Tensor:
        noise = subject.randn(tuple(x.shape), dtype, f"key_padding:garbage:{name}", scale=GARBAGE_SCALE)
        return torch.where(rows, noise, x)

    k, v = garbage(k, "k"), garbage(v, "v")
    if not cross:
        q = garbage(q, "q")
    found: list[Finding] = []
    with torch.no_grad():
        out = subject.run(module, q, k, v, key_padding_mask=padding)
        for b, (n, pad) in enumerate(zip(real, PADDED_KEYS)):
            lq = shape.lq if cross else n
            alone = subject.run(module, q[b:b + 1, :, :lq].contiguous(), k[b:b + 1, :, :n].contiguous(),
                                v[b:b + 1, :, :n].contiguous())
            found.append((relative_error(out[b:b + 1, :, :lq], alone),
                          f"batch element {b} with {pad} padded keys vs the element alone unpadded"))
    return judged("key_padding", found, structural_tolerance(dtype), dtype_name(dtype), note)
