"""Block-sparse windowed + global + random attention (BigBird's pattern, as Orion-MSP uses it), on cab's
block-sparse engine."""

from __future__ import annotations

import torch

from cab.attention.base import repeat_kv
from cab.attention.engine.blocksparse import BlockSparseAttention, Layout, layout_from_block_mask
from cab.attention.engine.masks import aligned, query_offset
from cab.attention.engine.prepare import softmax_scale
from cab.attention.engine.scores import masked_softmax_reference
from cab.patterns import Pattern
from cab.registry import register_attention

_CROSS = ("the band and the global blocks are defined on one position axis shared by queries and keys; two "
          "different sequences have no common positions")

_M1, _M2 = 0x5DEECE66D, 0x27BB2EE687B0B0FD  # odd multipliers of the counter hash (mod 2^62)
_MASK = (1 << 62) - 1


def _hash_uniform_index(seed: int, h: torch.Tensor, m: torch.Tensor, t: int, n: torch.Tensor) -> torch.Tensor:
    """A deterministic draw in [0, n) (n >= 1) for (seed, head h, query block m, draw t): a counter-based
    integer hash, so a block's draws depend on nothing else (not the length, nor how many blocks exist)."""
    h, m = h.to(torch.int64), m.to(torch.int64)  # FlexAttention passes int32 indices
    x = (h * 1_000_003 + m * 7_919 + (seed * 131 + t + 1) * 2_654_435_761) & _MASK
    for _ in range(2):
        x = ((x ^ (x >> 29)) * _M1) & _MASK
        x = ((x ^ (x >> 31)) * _M2) & _MASK
    return torch.remainder(x >> 20, n)


@register_attention(
    "window_global_random", patterns=("NS", "CS"), family="sparse", exact=False, mechanism="M36",
    citation="Orion-MSP: Multi-Scale Sparse Attention for Tabular In-Context Learning, arXiv 2511.02818 (2025); "
    "pattern of Zaheer et al., Big Bird: Transformers for Longer Sequences, NeurIPS 2020",
    unsupported={"NC": _CROSS, "CC": _CROSS},
)
class WindowGlobalRandomAttention(BlockSparseAttention):
    """Block-sparse attention over blocks of `block` tokens: query block m attends to key block n when
    |m - n| <= `window` // 2 (the band of `window` blocks), when n < `global_blocks` or m < `global_blocks`
    (the first blocks are global: they attend everywhere and everything attends to them), or when n is one of
    the `random_blocks` random blocks drawn for (head, m); softmax over the union with 1/sqrt(d) scores.
    Defaults: BigBird's block 64, 3 window blocks, 3 random blocks and 2 global blocks (ITC uses the first
    and last block; cab makes the first two global so the pattern never depends on where the sequence ends
    [EJ]); Orion-MSP describes the same band + global + random block mask.

    Random blocks: a counter-based hash of (seed, head, m, draw) picks each one, different per head as in
    BigBird: uniform over all key blocks of the element's extent in NS (its last real key + 1, so trailing
    padding cannot change them), over the blocks before m in CS (the causal variant the seeds describe:
    lower-triangular block mask). CS keeps token-level causality (key <= query) everywhere: global query
    blocks see their past only. Positions: query i sits at i (NS) and at i + Lk - Lq (CS, bottom-right).
    NC/CC are unsupported. The random choice is a fixed pattern, not a learned or differentiable one.

    Efficient path: cab's block-sparse engine (per-head block lists; global query blocks list every block,
    the others O(window + global + random) blocks); `backend="flex"`: the same in FlexAttention.
    reference(): every row's visible keys enumerated from the rule above (not from `mask_fn` or the layout)
    and a softmax per row. Padded keys are never seen.
    """

    heads_vary = True

    def __init__(self, pattern, num_heads, head_dim, block: int = 64, window: int = 3, global_blocks: int = 2,
                 random_blocks: int = 3, seed: int = 0, backend: str = "torch"):
        super().__init__(pattern, num_heads, head_dim)
        if block < 1 or window < 1 or global_blocks < 0 or random_blocks < 0:
            raise ValueError(f"block and window must be >= 1, global_blocks and random_blocks >= 0, got "
                             f"{block}, {window}, {global_blocks}, {random_blocks}")
        self.block, self.window, self.global_blocks = block, window, global_blocks
        self.random_blocks, self.seed = random_blocks, seed
        self.extent_dependent = self.pattern is Pattern.NS  # NS draws over the element's blocks
        self._set_backend(backend)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, block={self.block}, window={self.window}, global_blocks="
                f"{self.global_blocks}, random_blocks={self.random_blocks}, seed={self.seed}, backend={self.backend}")

    def _random(self, h, m, extent_blocks):
        """[(draw t) -> key block] for head h, query block m: each a tensor of block indices (-1: none)."""
        causal = self.pattern is Pattern.CS
        out = []
        for t in range(self.random_blocks):
            n = m if causal else extent_blocks
            draw = _hash_uniform_index(self.seed, h, m, t, torch.clamp(n, min=1))
            out.append(torch.where(n >= 1, draw, torch.full_like(draw, -1)))
        return out

    def mask_fn(self, lq, lk, extent=None):
        ext = None if extent is None else (extent + self.block - 1) // self.block

        def mask(b, h, p, j):
            m = torch.div(p, self.block, rounding_mode="floor")
            n = torch.div(j, self.block, rounding_mode="floor")
            vis = ((m - n).abs() <= self.window // 2) | (n < self.global_blocks) | (m < self.global_blocks)
            blocks = ext.to(p.device)[b] if ext is not None else torch.full_like(m, -(-lk // self.block))
            for draw in self._random(h, m, blocks):
                vis = vis | (draw == n)
            return vis

        return aligned(self.pattern, lq, lk, mask)

    def build_layout(self, lq, lk, block_q, block_k, extents) -> Layout:
        """Per head: the block mask at the pattern's block size, mapped onto the engine's tiles."""
        causal = self.pattern is Pattern.CS
        p = torch.arange(lq) + query_offset(self.pattern, lq, lk)
        m = torch.div(p, self.block, rounding_mode="floor")  # (Lq,)
        nk = -(-lk // block_k)
        heads = torch.arange(self.num_heads)[:, None]
        tiles = torch.zeros(self.num_heads, -(-lq // block_q), nk, dtype=torch.bool)
        q_tile = torch.arange(lq) // block_q

        def add(lo, hi):  # key positions [lo, hi] (per query row, (H|1, Lq)) into the tiles
            lo, hi = lo.expand(self.num_heads, lq).clamp(min=0), hi.expand(self.num_heads, lq).clamp(max=lk - 1)
            if causal:
                hi = torch.minimum(hi, p)
            ok = lo <= hi
            first, last = lo // block_k, hi // block_k
            span = int((last - first + 1)[ok].max()) if bool(ok.any()) else 0
            for s in range(span):
                kb = first + s
                hit = ok & (kb <= last)
                tiles[heads.expand_as(kb)[hit], q_tile.expand_as(kb)[hit], kb[hit]] = True

        half = self.window // 2
        add((m - half) * self.block, (m + half + 1) * self.block - 1)
        add(torch.zeros_like(p), torch.full_like(p, self.global_blocks * self.block - 1))
        is_global = m < self.global_blocks
        add(torch.where(is_global, 0, lk), torch.where(is_global, lk - 1, -1))
        for n_ext in extents:
            blocks = torch.full_like(m, -(-n_ext // self.block))
            for draw in self._random(heads, m[None], blocks):
                add(draw * self.block, torch.where(draw >= 0, draw * self.block + self.block - 1, -1))
        return layout_from_block_mask(tiles, block_q, block_k, lq, lk)

    def reference(self, q, k, v, key_padding_mask=None):
        """Row by row from the docstring's rule: row i at position p (CS: i + Lk - Lq) in block m = p // block
        sees the real keys (CS: <= p) of the blocks n with |m - n| <= window // 2, n < global_blocks, every
        block when m < global_blocks, and the blocks drawn by the counter hash for (head, m, draw) over
        [0, blocks of the element's extent) (NS) or [0, m) (CS); then a softmax over those keys."""
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        b, h, lq, d = q.shape
        lk, size = k.shape[-2], self.block
        causal = self.pattern is Pattern.CS
        allowed = torch.zeros(b, h, lq, lk, dtype=torch.bool)
        for bi in range(b):
            real = [key_padding_mask is None or not bool(key_padding_mask[bi, j]) for j in range(lk)]
            extent = max((j + 1 for j in range(lk) if real[j]), default=0)  # last real key + 1
            for hi in range(h):
                for i in range(lq):
                    p = i + (lk - lq if causal else 0)
                    m = p // size
                    blocks = {n for n in range(-(-lk // size)) if abs(m - n) <= self.window // 2
                              or n < self.global_blocks or m < self.global_blocks}
                    choices = m if causal else -(-extent // size)
                    if choices >= 1:
                        blocks |= {int(_hash_uniform_index(self.seed, torch.tensor(hi), torch.tensor(m), t,
                                                           torch.tensor(choices))) for t in range(self.random_blocks)}
                    keys = [j for j in range(lk) if real[j] and j // size in blocks and (not causal or j <= p)]
                    allowed[bi, hi, i, keys] = True
        return masked_softmax_reference(q, k, v, allowed.to(q.device), softmax_scale(d))
