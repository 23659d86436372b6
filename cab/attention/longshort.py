"""Transformer-LS (Long-Short Transformer): a sliding-window short-term attention and a long-term attention
to keys and values compressed by a learned dynamic projection, under one softmax."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cab.attention.base import Attention, repeat_kv
from cab.attention.engine.prepare import softmax_scale
from cab.registry import register_attention

# CAB's defaults: AttentionLS (noncausal) uses windows of 15, CausalLS windows of 256
DEFAULT_WINDOW = {"NS": 15, "CS": 256}


def masked_softmax(scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """softmax over the last dim restricted to `keep`; rows with nothing kept are all zero (not NaN)."""
    any_kept = keep.any(dim=-1, keepdim=True)
    scores = scores.masked_fill(~keep, float("-inf")).masked_fill(~any_kept, 0.0)
    return torch.softmax(scores, dim=-1).masked_fill(~any_kept, 0.0)


def _projection_weight(num_heads: int, fan_in: int, fan_out: int) -> nn.Parameter:
    """Per-head weight (H, fan_in, fan_out) initialised like nn.Linear's. No bias: the projection's softmax
    runs over positions, where a per-landmark bias cancels."""
    bound = 1 / math.sqrt(fan_in)
    return nn.Parameter(torch.empty(num_heads, fan_in, fan_out).uniform_(-bound, bound))


_CROSS = ("the short-term sliding window needs queries and keys on one position axis; a second sequence of another "
          "length has no window to attend")


@register_attention(
    "longshort", patterns=("NS", "CS"), family="hybrid", exact=False,
    citation="Zhu et al., Long-Short Transformer: Efficient Transformers for Language and Vision, NeurIPS 2021",
    unsupported={"NC": _CROSS, "CC": _CROSS},
)
class LongShortAttention(Attention):
    """Transformer-LS (Zhu et al. 2021): each query attends, under one softmax, to
    - short-term: the keys of a sliding window (segment-wise, Sec. 3.1), and
    - long-term: r keys and values compressed by a dynamic projection P = softmax(K W_P) taken over
      the sequence (Sec. 3.1, Eq. 3): K_bar = P^T K, V_bar = P^T V (no b: over positions it cancels).
    With `dual_ln`, two LayerNorms over the head dimension (Sec. 3.3, DualLN) normalise the window keys
    and values (LN_S) and the compressed ones (LN_L). W_P and the LayerNorms are parameters per head
    (W_P) or shared over heads (LayerNorms), drawn from torch's global generator at construction.

    NS: the sequence is cut into segments of w = `window_size` (default 15, CAB's); a query in segment s
    attends the keys of [s w - e, (s + 1) w + e) with e = max(w // 2, 1); the projection compresses the
    whole sequence into `num_landmarks` long-term keys.
    CS (the paper's autoregressive version, Sec. 3.2): window blocks of w (default 256, CAB's); a query at
    position p in block j attends the keys of [(j - 1) w, p]; the dynamic projection is applied per
    segment of `chunk_size` positions (each compressed into `chunk_rank` vectors), and a query at p
    attends the compressed segments that contain no position after p (segment c ends at
    (c + 1) chunk_size - 1 <= p), so nothing after p enters its row.

    Padding: padded keys are masked out of the window, get zero weight in every projection softmax (a
    segment with no real key is masked out), so appending padding changes nothing. Rows that see no key
    output zero. Self patterns with Lq < Lk align query i with key position i + Lk - Lq.
    Cost: NS O(L (w + r) d); CS O(L w d + L^2 d chunk_rank / chunk_size), the paper's causal complexity.
    Grouped-query heads share keys through `repeat_kv` (each query head has its own projection).

    Differences from CAB (from NVIDIA/transformer-ls): CAB computes the projection from the layer input
    and includes the q/k/v/output projections; here the projection reads the keys, as in the paper's Eq. 3
    (the backbone owns the other projections). CAB's causal version adds Transformer-XL relative position
    terms and a memory cache; they are not part of this mechanism.

    CS timing against CAB's released CausalLS (efficient_attention/modules/transformer_ls.py in CAB's
    efficient-attention, vendored in benchmarks/third_party/cab; read off the gradient of each output row
    with respect to each input position):
    - Window: CAB's get_tiles/get_diagonals give the query at p a sliding window of exactly w keys,
      [p - w + 1, p]; cab's window is block-aligned, [(floor(p / w) - 1) w, p], between w and 2w - 1 keys.
      Before position 0 CAB's window holds slots of its memory cache (`h_cache`, all zeros, so after the
      projections and DualLN their keys and values are the LayerNorm's bias, 0 at init); they stay in the
      softmax with their position scores. cab's window holds real positions only.
    - Chunks: CAB masks the compressed chunks with triu(..., diagonal=mem_len / chunk_size), so the query
      at p sees chunk c only when c < floor(p / chunk_size), the chunks before its own; cab shows chunk c
      from (c + 1) chunk_size - 1 <= p on, so the last position of a chunk already sees that chunk (itself
      included), one position earlier than CAB. CAB's rows also always see mem_len / chunk_size (32 with
      its defaults) compressed slots of the zero cache.
    E.g. w = 2, chunk_size = 8: CAB's row 13 reads positions 0-7, 12, 13 and row 15 reads 0-7, 14, 15;
    cab's row 13 reads 0-7, 10-13 and row 15 reads 0-15.
    """

    def __init__(self, pattern, num_heads, head_dim, num_landmarks: int = 16, window_size: "int | None" = None,
                 chunk_size: int = 32, chunk_rank: int = 1, dual_ln: bool = True):
        super().__init__(pattern, num_heads, head_dim)
        window_size = DEFAULT_WINDOW[self.pattern.value] if window_size is None else window_size
        if min(num_landmarks, window_size, chunk_size, chunk_rank) < 1:
            raise ValueError("num_landmarks, window_size, chunk_size and chunk_rank must be positive")
        self.num_landmarks, self.window_size = num_landmarks, window_size
        self.chunk_size, self.chunk_rank, self.dual_ln = chunk_size, chunk_rank, dual_ln
        ranks = chunk_rank if self.causal else num_landmarks
        self.proj_weight = _projection_weight(num_heads, head_dim, ranks)
        self.ln_short = nn.LayerNorm(head_dim) if dual_ln else nn.Identity()
        self.ln_long = nn.LayerNorm(head_dim) if dual_ln else nn.Identity()

    def _prepare(self, q, k, v, key_padding_mask):
        """Keys and values per query head, the real-key mask (B, Lk) and the query offset."""
        lq, lk = q.shape[-2], k.shape[-2]
        if lq > lk:
            raise ValueError(f"longshort is self attention: Lq ({lq}) cannot exceed Lk ({lk})")
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        if key_padding_mask is None:
            real = torch.ones(k.shape[0], lk, dtype=torch.bool, device=k.device)
        else:
            real = ~key_padding_mask.to(device=k.device, dtype=torch.bool)
        return k, v, real, lk - lq

    # efficient path -------------------------------------------------------------------------------

    def forward(self, q, k, v, key_padding_mask=None):
        k, v, real, offset = self._prepare(q, k, v, key_padding_mask)
        b, h, length, w = k.shape[0], k.shape[1], k.shape[-2], self.window_size
        segments = -(-length // w)
        tail = segments * w - length
        # queries padded at the front so that query row p sits at key position p, and to whole segments
        queries = F.pad(q * softmax_scale(q.shape[-1]), (0, 0, offset, tail))  # (B, H, S w, D)
        q_tiles = queries.reshape(b, h, segments, w, q.shape[-1])
        short_k, short_v = self.ln_short(k), self.ln_short(v)
        if self.causal:
            before, span = w, 2 * w  # block j sees keys [(j - 1) w, (j + 1) w), then the causal mask
        else:
            before = max(w // 2, 1)
            span = w + 2 * before
        after = span - before - w
        k_tiles = F.pad(short_k, (0, 0, before, tail + after)).unfold(2, span, w)  # (B, H, S, D, span)
        v_tiles = F.pad(short_v, (0, 0, before, tail + after)).unfold(2, span, w).transpose(-1, -2)
        window_keep = F.pad(real, (before, tail + after), value=False).unfold(1, span, w)[:, None, :, None, :]
        if self.causal:
            rows = torch.arange(w, device=q.device)[:, None]
            window_keep = window_keep & (torch.arange(span, device=q.device)[None, :] <= rows + w)
        long_k, long_v, long_keep = self._long_memory(k, v, real, segments * w)
        ranks = long_k.shape[-2]
        # one softmax over both sets of scores; masked entries get the lowest finite score, so a row with
        # no visible key stays finite (it is zeroed below)
        lowest = torch.finfo(q.dtype).min
        long_scores = (queries @ long_k.transpose(-1, -2)).view(b, h, segments, w, ranks)
        window_scores = q_tiles @ k_tiles
        scores = torch.cat([long_scores.masked_fill_(~long_keep, lowest),
                            window_scores.masked_fill_(~window_keep, lowest)], dim=-1)
        probs = torch.softmax(scores, dim=-1)
        out = probs[..., :ranks] @ long_v[:, :, None] + probs[..., ranks:] @ v_tiles  # (B, H, S, w, D)
        seen = long_keep.any(dim=-1, keepdim=True) | window_keep.any(dim=-1, keepdim=True)
        if not bool(seen.all()):
            out = out * seen
        return out.reshape(b, h, segments * w, -1)[:, :, offset:length]

    def _long_memory(self, k, v, real, rows):
        """(K_bar, V_bar (B, H, R, D), keep broadcastable to (B, H, S, w, R)) for `rows` query positions."""
        b, h, length, d = k.shape
        if not self.causal:
            proj = masked_softmax(torch.einsum("bhld,hdr->bhrl", k, self.proj_weight), real[:, None, None, :])
            keep = real.any(dim=-1)[:, None, None, None, None]  # (B, 1, 1, 1, 1): every landmark or none
            return self.ln_long(proj @ k), self.ln_long(proj @ v), keep
        size = self.chunk_size
        chunks = -(-length // size)
        pad = (0, 0, 0, chunks * size - length)
        k_chunks = F.pad(k, pad).reshape(b, h, chunks, size, d)
        v_chunks = F.pad(v, pad).reshape(b, h, chunks, size, d)
        real_chunks = F.pad(real, (0, chunks * size - length), value=False).reshape(b, chunks, size)
        logits = torch.einsum("bhcld,hdr->bhcrl", k_chunks, self.proj_weight)
        proj = masked_softmax(logits, real_chunks[:, None, :, None, :])
        long_k = self.ln_long(proj @ k_chunks).reshape(b, h, chunks * self.chunk_rank, d)
        long_v = self.ln_long(proj @ v_chunks).reshape(b, h, chunks * self.chunk_rank, d)
        position = torch.arange(rows, device=k.device)
        complete = torch.div(position + 1, size, rounding_mode="floor")  # segments lying wholly in [0, p]
        before = torch.arange(chunks, device=k.device)[None, :] < complete[:, None]
        keep = before[None] & real_chunks.any(dim=-1)[:, None, :]  # (B, rows, chunks)
        keep = keep.repeat_interleave(self.chunk_rank, dim=-1)
        return long_k, long_v, keep.reshape(b, 1, rows // self.window_size, self.window_size, -1)

    # naive formulation --------------------------------------------------------------------------------

    def reference(self, q, k, v, key_padding_mask=None):
        """Row by row (all heads at once): the row's window keys listed from the definition, the compressed
        keys from explicit softmaxes over the real keys of the sequence (NS) or of each earlier segment (CS),
        one softmax over both sets of scores."""
        k, v, real, offset = self._prepare(q, k, v, key_padding_mask)
        b, h, lq, d = q.shape
        length, w = k.shape[-2], self.window_size
        scale = softmax_scale(d)
        short_k, short_v = self.ln_short(k), self.ln_short(v)
        out = torch.zeros(b, h, lq, v.shape[-1], dtype=v.dtype, device=v.device)
        for bi in range(b):
            real_idx = [j for j in range(length) if bool(real[bi, j])]
            memory = self._reference_memory(k[bi], v[bi], real_idx)  # list of (segment, K_bar, V_bar)
            for i in range(lq):
                p = i + offset
                if self.causal:
                    lo, hi = (p // w - 1) * w, p + 1
                    long = [(kb, vb) for c, kb, vb in memory if (c + 1) * self.chunk_size - 1 <= p]
                else:
                    seg, ext = p // w, max(w // 2, 1)
                    lo, hi = seg * w - ext, seg * w + w + ext
                    long = [(kb, vb) for _, kb, vb in memory]
                window = [j for j in real_idx if lo <= j < hi]
                keys = [kb for kb, _ in long] + [short_k[bi][:, window]]
                values = [vb for _, vb in long] + [short_v[bi][:, window]]
                all_k, all_v = torch.cat(keys, dim=1), torch.cat(values, dim=1)  # (H, n, D)
                if all_k.shape[1] == 0:
                    continue
                weights = torch.softmax((all_k @ q[bi, :, i, :, None]).squeeze(-1) * scale, dim=-1)
                out[bi, :, i] = (weights[:, None, :] @ all_v).squeeze(1)
        return out

    def _reference_memory(self, k, v, real_idx):
        """[(segment, K_bar (H, r, D), V_bar (H, r, D))]: one entry for the whole sequence (NS, segment 0),
        or one per segment of chunk_size positions holding a real key (CS)."""
        if not self.causal:
            groups = [(0, real_idx)] if real_idx else []
        else:
            size = self.chunk_size
            groups = [(c, [j for j in real_idx if j // size == c]) for c in range(-(-k.shape[1] // size))]
            groups = [(c, idx) for c, idx in groups if idx]
        memory = []
        for segment, idx in groups:
            weights = torch.softmax(k[:, idx] @ self.proj_weight, dim=1).transpose(1, 2)  # over the n positions
            memory.append((segment, self.ln_long(weights @ k[:, idx]), self.ln_long(weights @ v[:, idx])))
        return memory

    def extra_repr(self) -> str:
        detail = (f"chunk_size={self.chunk_size}, chunk_rank={self.chunk_rank}" if self.causal
                  else f"num_landmarks={self.num_landmarks}")
        return f"{super().extra_repr()}, window_size={self.window_size}, {detail}, dual_ln={self.dual_ln}"
