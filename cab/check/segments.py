"""`segments`: packed variable-length sequences (attentions declaring `supports_segments`, self patterns).

A batch of two rows, each packing several segments (runs of equal consecutive ids; one id reappears after
another segment, which must start a new segment), the second row with padded keys at its end, is run once
with `segment_ids`. Each segment's output rows must equal the segment run alone (its real tokens only, no
mask, no segment ids), and the gradient of each segment's output with respect to q, k and v at every
position outside the segment (other segments and padding) must be zero: no cross-segment leak.
"""

from __future__ import annotations

import torch

from cab.check.compare import max_abs, relative_error, structural_tolerance
from cab.check.gradients import vjp
from cab.check.outcomes import CheckOutcome, Finding, judged
from cab.check.subject import Subject, dtype_name

# per batch row of the main shape (48 tokens): (segment id, length) runs; id 3 recurs in row 0
SEGMENTS = (((3, 7), (0, 1), (3, 17), (1, 23)), ((5, 20), (2, 28)))
PADDED_KEYS = (0, 5)  # padded keys at the end of each row (inside its last segment)


def segment_layout(length: int, device: torch.device) -> "tuple[torch.Tensor, list[list[tuple[int, int]]]]":
    """(segment ids (B, L), per row the [start, end) of each segment)."""
    ids, spans = [], []
    for row in SEGMENTS:
        if sum(n for _, n in row) != length:
            raise ValueError(f"the segments check needs rows of {sum(n for _, n in row)} tokens, got {length}")
        values, bounds, start = [], [], 0
        for sid, n in row:
            values += [sid] * n
            bounds.append((start, start + n))
            start += n
        ids.append(values)
        spans.append(bounds)
    return torch.tensor(ids, dtype=torch.long, device=device), spans


def check_segments(subject: Subject, dtype: "torch.dtype | None" = None) -> CheckOutcome:
    """Packed segments match each segment run alone, and no gradient crosses a segment boundary."""
    structural, note = subject.structural()
    dtype = dtype or structural
    note = note if dtype == structural else ""
    shape = subject.main
    if shape.batch != len(SEGMENTS) or shape.lq != shape.lk:
        raise ValueError(f"the segments check needs a self-pattern main shape with batch {len(SEGMENTS)}")
    module = subject.module(shape.head_dim, dtype)
    q, k, v = subject.inputs(shape, dtype, "segments")
    ids, spans = segment_layout(shape.lq, q.device)
    real = torch.tensor([shape.lk - p for p in PADDED_KEYS], device=q.device)
    padding = torch.arange(shape.lk, device=q.device)[None, :] >= real[:, None]
    found: list[Finding] = []
    leaves = {n: t.detach().requires_grad_() for n, t in zip("qkv", (q, k, v))}
    out = subject.run(module, leaves["q"], leaves["k"], leaves["v"], key_padding_mask=padding, segment_ids=ids)
    scale = max_abs(out[:, :, : int(real.min())])
    cotangent = subject.randn(tuple(out.shape), dtype, "segments:dout")
    with torch.no_grad():
        for b, bounds in enumerate(spans):
            for s, (start, end) in enumerate(bounds):
                stop = min(end, int(real[b]))
                if stop <= start:
                    continue
                alone = subject.run(module, *(t[b:b + 1, :, start:stop].contiguous() for t in (q, k, v)))
                found.append((relative_error(out[b:b + 1, :, start:stop], alone, scale),
                              f"row {b} segment {s} [{start}:{stop}] packed vs run alone"))
    pieces = [(b, start, end) for b, bounds in enumerate(spans) for start, end in bounds]
    for index, (b, start, end) in enumerate(pieces):
        stop = min(end, int(real[b]))
        if stop <= start:
            continue
        picked = torch.zeros_like(cotangent)
        picked[b, :, start:stop] = cotangent[b, :, start:stop]
        grads = vjp(out, leaves, picked, retain_graph=index < len(pieces) - 1)
        inside = torch.zeros(shape.batch, 1, shape.lk, 1, dtype=torch.bool, device=q.device)
        inside[b, :, start:stop] = True
        present = {n: g for n, g in grads.items() if g is not None}
        own = max((max_abs(g.masked_fill(~inside, 0.0)) for g in present.values()), default=0.0)
        for name, g in present.items():
            leak = max_abs(g.masked_fill(inside, 0.0))
            error = leak / own if own > 0 else (0.0 if leak == 0 else float("inf"))
            found.append((error, f"d out[row {b}, {start}:{stop}] / d {name} outside that segment"))
    return judged("segments", found, structural_tolerance(dtype), dtype_name(dtype), note)
