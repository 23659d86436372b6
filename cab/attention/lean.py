"""Lean Attention (M4): exact softmax attention as independent partial attentions over contiguous tiles of
the keys, combined by the associative online-softmax merge — the decode-phase algorithm that splits one
query's long KV cache across workers (stream-K style) and fixes the partial results up afterwards."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cab.attention.engine.kv_cache import KVCacheAttention
from cab.attention.engine.prepare import compute_dtype, grouped_compute, softmax_scale
from cab.attention.engine.scores import dense_matmul_flops, masked_softmax_attention
from cab.patterns import attention_mask
from cab.registry import register_attention


@dataclass(frozen=True)
class Partial:
    """Softmax attention of some queries over a subset of the keys, before normalisation: the row maximum
    `m` of the scores (-inf where the subset holds no visible key), the sum `l` of exp(score - m) and the
    unnormalised output `o` = sum exp(score - m) v. Shapes (..., Lq, 1), (..., Lq, 1), (..., Lq, Dv)."""

    m: torch.Tensor
    l: torch.Tensor  # noqa: E741 -- the (m, l) names of FlashAttention's online softmax; a public field read by tests
    o: torch.Tensor

    def normalised(self) -> torch.Tensor:
        """o / l, with rows that saw no key set to 0."""
        return self.o / torch.where(self.l > 0, self.l, torch.ones_like(self.l))


def partial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor,
                      scale: float) -> Partial:
    """The Partial of queries q (..., Lq, D) over keys k, v (..., n, D), visible (..., Lq, n) bool. The
    row maximum is detached: the final output is invariant to it, so it carries no gradient."""
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    m = scores.detach().amax(dim=-1, keepdim=True)
    shift = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(scores - shift)
    return Partial(m, p.sum(dim=-1, keepdim=True), p @ v)


def merge(a: Partial, b: Partial) -> Partial:
    """The Partial over the union of two disjoint key subsets: rescale each by exp(m_i - max(m_a, m_b)) and
    add. Exact, associative and commutative, so tiles can be merged in any grouping and order."""
    m = torch.maximum(a.m, b.m)
    shift = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    wa, wb = torch.exp(a.m - shift), torch.exp(b.m - shift)  # exp(-inf) = 0 for an empty side
    return Partial(m, wa * a.l + wb * b.l, wa * a.o + wb * b.o)


def merge_tree(parts: "list[Partial]") -> Partial:
    """Merge partials pairwise in a balanced tree (the fix-up of the workers' results)."""
    if not parts:
        raise ValueError("nothing to merge")
    while len(parts) > 1:
        parts = [merge(parts[i], parts[i + 1]) if i + 1 < len(parts) else parts[i] for i in range(0, len(parts), 2)]
    return parts[0]


@register_attention(
    "lean", patterns=("NS", "CS", "NC", "CC"), family="exact", exact=True, mechanism="M4",
    citation="Sanovar et al., Lean Attention: Hardware-Aware Scalable Attention Mechanism for the Decode-Phase "
    "of Transformers, MLSys 2025",
)
class LeanAttention(KVCacheAttention):
    """Exact attention computed tile by tile over the keys: each tile of `tile_size` keys (the paper's
    LeanTile) yields a Partial (row max, exp-sum, unnormalised output), and the Partials are combined with
    the online-softmax merge, which is associative — so the split of the keys across workers (the paper's
    stream-K partition, which may cut a head's keys anywhere) never changes the result.

    decode_step (CS, CC) splits the cached keys into `num_splits` equal parts (default: one per LeanTile)
    and merges the parts' Partials in a balanced tree, as the decode kernel's reduction does. forward (all
    four patterns) walks the key tiles in order and merges each into a running Partial, so it never holds
    more than one Lq x tile score block (plus what autograd saves in training). The tiling is [BG]: the
    paper sizes LeanTiles per GPU (256 keys for d = 64); on CPU it is a hyper-parameter. The visibility mask
    is the pattern's (CS bottom-right aligned), so a tile in which a row sees no key contributes nothing.
    """

    complexity = {"time": 2, "memory": 2}

    def __init__(self, pattern, num_heads, head_dim, tile_size: int = 256, num_splits: "int | None" = None):
        super().__init__(pattern, num_heads, head_dim)
        if tile_size < 1 or (num_splits is not None and num_splits < 1):
            raise ValueError(f"tile_size and num_splits must be positive, got {tile_size} and {num_splits}")
        self.tile_size = tile_size
        self.num_splits = num_splits

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, tile_size={self.tile_size}, num_splits={self.num_splits}"

    def forward(self, q, k, v, key_padding_mask=None):
        q, k, v, out_dtype = grouped_compute(q, k, v)
        lq, lk = q.shape[-2], k.shape[-2]
        visible = attention_mask(self.pattern, lq, lk, key_padding_mask, device=q.device)
        scale = softmax_scale(q.shape[-1])
        running = None
        for start in range(0, lk, self.tile_size):
            stop = min(start + self.tile_size, lk)
            part = partial_attention(q, k[:, :, start:stop], v[:, :, start:stop], visible[..., start:stop], scale)
            running = part if running is None else merge(running, part)
        if running is None:  # no keys at all
            return q.new_zeros(*q.shape[:-1], v.shape[-1]).to(out_dtype)
        return running.normalised().to(out_dtype)

    def reference(self, q, k, v, key_padding_mask=None):
        """Softmax attention with the full score matrix (cab's eager oracle)."""
        return masked_softmax_attention(self, q, k, v, key_padding_mask)

    def algorithmic_flops(self, batch, lq, lk, kv_heads):
        return dense_matmul_flops(batch, self.num_heads, lq, lk, self.head_dim, self.head_dim)

    def splits(self, length: int) -> "list[tuple[int, int]]":
        """The (start, stop) key ranges decode_step gives its workers."""
        count = self.num_splits or max(1, -(-length // self.tile_size))
        count = max(1, min(count, length))
        bounds = [round(i * length / count) for i in range(count + 1)]
        return [(bounds[i], bounds[i + 1]) for i in range(count)]

    def attend_cached(self, q, keys, values, real):
        b, hq, _, d = q.shape
        hkv = keys.shape[1]
        dtype = compute_dtype(q.dtype)
        grouped = q.to(dtype).reshape(b, hkv, hq // hkv, 1, d)  # query heads sharing a key/value head
        keys, values = keys.to(dtype).unsqueeze(2), values.to(dtype).unsqueeze(2)
        length = keys.shape[-2]
        if length == 0:
            return q.new_zeros(b, hq, 1, values.shape[-1])
        visible = torch.ones(1, 1, 1, 1, length, dtype=torch.bool, device=q.device) if real is None \
            else real[:, None, None, None, :]
        scale = softmax_scale(d)
        parts = [partial_attention(grouped, keys[..., s:e, :], values[..., s:e, :], visible[..., s:e], scale)
                 for s, e in self.splits(length)]
        out = merge_tree(parts).normalised()
        return out.reshape(b, hq, 1, values.shape[-1]).to(q.dtype)
