"""Delta Attention: a correction wrapper over any registered (sparse) attention. Exact attention is computed
for every gamma-th query row; the difference between the exact and the sparse output at that row is added
to the sparse outputs of the rows of its group."""

from __future__ import annotations

import torch

from cab.attention.base import Attention, repeat_kv
from cab.attention.engine.prepare import query_positions, real_keys, real_queries, softmax_scale
from cab.attention.engine.scores import masked_softmax_rows
from cab.patterns import Pattern
from cab.registry import register_attention

_CROSS = ("the default base attention (local, a sliding window) has no cross pattern; patterns are declared "
          "per registered attention, so delta declares those of its default base")
_ELEMENTS = 1 << 24


@register_attention(
    "delta", patterns=("NS", "CS"), family="sparse", exact=False, mechanism="M44",
    citation="Willette et al., Delta Attention: Fast and Accurate Sparse Attention Inference by Delta "
    "Correction, arXiv preprint 2025",
    unsupported={"NC": _CROSS, "CC": _CROSS},
)
class DeltaAttention(Attention):
    """Delta correction (Willette et al. 2025, Sec. 3): with O_s the output of a sparse attention and O_f
    exact softmax attention, Delta Attention computes O_f only at the rows r = 0, gamma, 2 gamma, ... and
    outputs, for every row i,
        O(i) = O_s(i) + (O_f(r_i) - O_s(r_i)),   r_i = gamma floor(i / gamma),
    i.e. each group of gamma consecutive rows shares the shift of the attention output measured at its
    first row (the paper's correction of the distributional shift sparse attention causes). The sparse
    attention is any registered attention, named by `base` with hyper-parameters `base_hparams`, built for
    the same pattern, heads and head dim with cab.create_attention (its parameters are this module's).
    Defaults: base = "local" (a sliding window, the paper's headline base; window and sinks from
    base_hparams, default {"window": 256, "sinks": 4} — attention sinks + sliding window as in the
    paper, whose windows at 131K tokens are wider; 256 keeps CPU checks fast), gamma = 64 (1/64 of the rows
    dense, the paper's ~98.5% sparsity).

    [BG] choices: the anchor of a group is its first row, so that under CS the correction of row i reads
    only keys <= r_i <= i and queries <= i (an anchor after i would leak); the paper's figure places the
    dense rows likewise at the start of each stride. A padded anchor row (self patterns) gives no
    correction to its group. Positions: query i at key position i + Lk - Lq (bottom-right) in CS, as cab's
    mask. Everything is differentiable wherever the base is.

    Cost: the base's plus O((Lq / gamma) Lk d) for the dense rows, in chunks of anchors (no Lq x Lk
    tensor). computed_pairs is the base's plus the visible pairs of the anchor rows (None if the base does
    not count its pairs). No FlexAttention path of its own: the dense anchor rows are a plain
    softmax over a few rows; the base brings its own backend.
    """

    # the dense anchor rows are L^2/gamma (the base's own cost comes on top)
    complexity = {"time": 2, "memory": 1}

    def __init__(self, pattern, num_heads, head_dim, base: str = "local", base_hparams: "dict | None" = None,
                 gamma: int = 64):
        super().__init__(pattern, num_heads, head_dim)
        from cab.registry import create_attention

        if gamma < 1:
            raise ValueError(f"gamma must be positive, got {gamma}")
        if base == "delta":
            raise ValueError("delta cannot wrap itself")
        if base_hparams is None:
            base_hparams = {"window": 256, "sinks": 4} if base == "local" else {}
        self.base_name, self.base_hparams, self.gamma = base, dict(base_hparams), gamma
        self.base = create_attention(base, pattern, num_heads, head_dim, **self.base_hparams)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, base={self.base_name!r}, base_hparams={self.base_hparams}, gamma={self.gamma}"

    def _anchors(self, lq: int, device) -> torch.Tensor:
        return torch.arange(0, lq, self.gamma, device=device)

    def _dense_rows(self, q, k, v, key_padding_mask, rows: torch.Tensor) -> torch.Tensor:
        """Exact softmax attention of the query rows `rows` (B, H, n, Dv), rows seeing no key 0."""
        b, h, lq, d = q.shape
        lk = k.shape[-2]
        real = real_keys(key_padding_mask, b, lk, q.device)
        step = max(1, _ELEMENTS // max(1, b * h * lk))
        outs = []
        for r0 in range(0, rows.numel(), step):
            sel = rows[r0:r0 + step]
            s = (q[:, :, sel] * softmax_scale(d)) @ k.transpose(-1, -2)
            ok = real[:, None, None, :]
            if self.pattern is Pattern.CS:
                ok = ok & (torch.arange(lk, device=q.device)[None, :] <= query_positions(lq, lk, q.device)[sel, None])
            outs.append(masked_softmax_rows(s, ok, v)[0])
        return torch.cat(outs, dim=2)

    def _correct(self, sparse, dense, key_padding_mask, lk):
        b, h, lq, _ = sparse.shape
        anchors = self._anchors(lq, sparse.device)
        delta = dense - sparse[:, :, anchors]
        if key_padding_mask is not None:
            real_q = real_queries(self.pattern, real_keys(key_padding_mask, b, lk, sparse.device), lq)
            delta = delta * real_q[:, anchors].to(delta.dtype)[:, None, :, None]
        group = torch.arange(lq, device=sparse.device) // self.gamma
        return sparse + delta[:, :, group]

    def forward(self, q, k, v, key_padding_mask=None):
        sparse = self.base(q, k, v, key_padding_mask)
        kr, vr = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        dense = self._dense_rows(q, kr, vr, key_padding_mask, self._anchors(q.shape[-2], q.device))
        return self._correct(sparse, dense, key_padding_mask, k.shape[-2])

    def computed_pairs(self, q, k, v, key_padding_mask=None):
        inner = self.base.computed_pairs(q, k, v, key_padding_mask)
        if inner is None:
            return None
        from cab.patterns import attention_mask

        b, h, lq, _ = q.shape
        lk = k.shape[-2]
        mask = attention_mask(self.pattern, lq, lk, key_padding_mask, device=q.device)
        anchors = self._anchors(lq, q.device)
        return inner + h * int(mask[:, :, anchors].expand(b, 1, anchors.numel(), lk).sum())

    def reference(self, q, k, v, key_padding_mask=None):
        """The base's reference (its forward when it has none), exact softmax rows computed one by one at
        the anchors, and the correction added row by row."""
        sparse = self.base.reference(q, k, v, key_padding_mask) if self.base.has_reference() else \
            self.base(q, k, v, key_padding_mask)
        kr, vr = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        b, h, lq, d = q.shape
        lk = kr.shape[-2]
        pad = torch.zeros(b, lk, dtype=torch.bool) if key_padding_mask is None else key_padding_mask.bool().cpu()
        rows = []
        for i in range(lq):
            r = (i // self.gamma) * self.gamma
            p = r + lk - lq
            row = []
            for bi in range(b):
                keys = [j for j in range(lk) if not pad[bi, j] and (self.pattern is not Pattern.CS or j <= p)]
                real_anchor = self.cross or not (0 <= p < lk) or not bool(pad[bi, p])
                if not keys:
                    dense = torch.zeros(h, vr.shape[-1], dtype=vr.dtype, device=vr.device)
                else:
                    w = torch.softmax((kr[bi][:, keys] @ q[bi, :, r, :, None])[..., 0] * softmax_scale(d), dim=-1)
                    dense = (w[:, None, :] @ vr[bi][:, keys])[:, 0]
                delta = dense - sparse[bi, :, r] if real_anchor else torch.zeros_like(dense)
                row.append(sparse[bi, :, i] + delta)
            rows.append(torch.stack(row))
        return torch.stack(rows, dim=2)
