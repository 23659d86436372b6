"""ProbSparse attention (Informer): exact softmax rows for the top-u "active" queries, the mean of V for the
others, queries ranked by a sparsity measurement over a few sampled keys."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cab.attention.base import Attention, repeat_kv
from cab.attention.engine.prepare import softmax_scale
from cab.attention.engine.routing import sample_ranks
from cab.patterns import Pattern
from cab.registry import register_attention

_SCORE_CHUNK = 1 << 18  # elements of gathered keys held at once while measuring sparsity


def log_budget(factor: int, n: torch.Tensor) -> torch.Tensor:
    """Informer's c * ceil(ln n), capped at n (0 for n <= 1); n is an int64 tensor."""
    logs = torch.ceil(torch.log(n.clamp_min(1).to(torch.float64))).to(torch.int64)
    return torch.minimum(factor * logs, n)


def prefix_rank(scores: torch.Tensor) -> torch.Tensor:
    """#{j < i : scores_j >= scores_i} for every i along the last dim, in O(L log^2 L): for each level of a
    binary tree over positions, every element of a right half counts the elements of its left sibling that
    are >= it (sort the left half, binary-search the right one)."""
    length = scores.shape[-1]
    size = 1 << max(0, (length - 1).bit_length())
    lead = scores.shape[:-1]
    values = F.pad(scores, (0, size - length), value=float("-inf"))
    rank = torch.zeros(*lead, size, dtype=torch.int64, device=scores.device)
    half = 1
    while half < size:
        blocks = values.reshape(*lead, size // (2 * half), 2, half)
        left = blocks[..., 0, :].sort(dim=-1).values.contiguous()
        below = torch.searchsorted(left, blocks[..., 1, :].contiguous())  # left elements < each right one
        rank.view(*lead, size // (2 * half), 2, half)[..., 1, :] += half - below
        half *= 2
    return rank[..., :length]


@register_attention(
    "probsparse", patterns=("NS", "CS", "NC", "CC"), family="sparse", exact=False,
    citation="Zhou et al., Informer: Beyond Efficient Transformer for Long Sequence Time-Series Forecasting, "
    "AAAI 2021",
)
class ProbSparseAttention(Attention):
    """Informer's ProbSparse self-attention (Zhou et al. 2021, Sec. 3.1, Eq. 4 and Lemma 1).

    Each query row i samples S_i = c ceil(ln n_i) of its n_i visible keys (with replacement, capped at n_i,
    at least one) and gets the sparsity measurement M(q_i) = max_s q_i.k_s / sqrt(d) - mean_s q_i.k_s /
    sqrt(d) over those samples. Active queries get exact softmax attention over their visible keys; lazy
    queries get the mean of V over their visible keys. `factor` is c.

    Which queries are active:
    - NS, NC: the u = c ceil(ln n_q) queries with the largest M (n_q real queries; ties go to the earlier
      row), as in Informer.
    - CS, CC: a global top-u would let every row's fate depend on later queries (a leak), so the selection
      is the incremental one: row i is active iff fewer than u_i = c ceil(ln r_i) of the earlier rows have
      M >= M(q_i), r_i being the number of real rows 0..i; i.e. q_i is in the top-u of its prefix, exactly
      what a decoder that ranks the queries seen so far would decide. CS samples only keys <= i and its
      lazy rows get the cumulative mean of V (Informer's code uses the cumulative sum, a bug); CC sees every
      key, so its lazy rows get the plain mean.

    Sampling: a counter-based hash of (`seed`, row, sample) picks the rank of the sampled key among the
    row's visible real keys, so the same seed gives the same samples, and appending padding or removing
    later rows changes no sample (fixed samples; nothing is redrawn between calls). Padding: padded keys
    are never sampled, never attended and never averaged; in self patterns padded query rows are never
    active. Rows that see no key output zero. M is computed without gradient (it only selects rows);
    gradients flow through the active rows' attention and the lazy means.

    Cost: O(L S d) for the measurement, O(u L d) for the active rows, O(L log^2 L) for the causal ranking,
    O(L d) for the means; nothing L x L is formed.

    Differences from CAB (Informer's code): CAB ignores the key padding mask, draws its samples with
    torch.randint (unseeded, over all positions), divides the sampled sum by L_K instead of the number of
    samples, and supports NS only.
    """

    def __init__(self, pattern, num_heads, head_dim, factor: int = 5, seed: int = 0):
        super().__init__(pattern, num_heads, head_dim)
        if factor < 1:
            raise ValueError(f"factor must be positive, got {factor}")
        self.factor, self.seed = factor, seed

    # geometry shared by forward and reference -------------------------------------------------------

    def _layout(self, b: int, lq: int, lk: int, key_padding_mask, device):
        """(real keys (B, Lk), visible real-key count per row (B, Lq), real queries (B, Lq), offset) with
        query i at key position i + offset in self patterns (bottom-right alignment)."""
        if key_padding_mask is None:
            real_k = torch.ones(b, lk, dtype=torch.bool, device=device)
        else:
            real_k = ~key_padding_mask.to(device=device, dtype=torch.bool)
        offset = lk - lq
        position = torch.arange(lq, device=device) + offset
        inside = (position >= 0) & (position < lk)
        if self.pattern is Pattern.CS:
            cum = torch.cumsum(real_k.long(), dim=-1)
            counts = torch.where(position >= 0, cum[:, position.clamp(0, lk - 1)], 0)
        else:
            counts = real_k.sum(dim=-1, keepdim=True).expand(b, lq)
        real_q = torch.ones(b, lq, dtype=torch.bool, device=device)
        if not self.cross:
            real_q = torch.where(inside, real_k[:, position.clamp(0, lk - 1)], real_q)
        return real_k, counts, real_q, offset

    # efficient path -------------------------------------------------------------------------------

    def _sparsity(self, q, k, real_k, counts, candidate):
        """M (B, H, Lq) over the sampled keys; -inf for rows that may not be active."""
        b, h, lq, d = q.shape
        samples_per_row = log_budget(self.factor, counts).clamp_min(1)
        samples = int(samples_per_row.max())
        ranks = sample_ranks(self.seed, torch.arange(lq, device=q.device), samples, counts)
        lk = k.shape[-2]
        order = torch.argsort((~real_k).to(torch.int8), dim=-1, stable=True)  # real positions first
        positions = order.gather(1, ranks.reshape(b, -1)).reshape(b, lq, samples)
        # per head and per cache-sized block of rows: gather the sampled keys (contiguous rows of
        # (B * Lk, D)) and dot them with the row's query while they are still in cache
        keys = k.transpose(0, 1).reshape(h, b * lk, d)
        queries = q.transpose(0, 1).reshape(h, b * lq, d)
        flat = (positions + lk * torch.arange(b, device=q.device)[:, None, None]).reshape(b * lq, samples)
        chunk = max(1, _SCORE_CHUNK // (samples * d))
        scores = q.new_empty(h, b * lq, samples)
        for head in range(h):
            for r0 in range(0, b * lq, chunk):
                gathered = keys[head].index_select(0, flat[r0:r0 + chunk].reshape(-1)).view(-1, samples, d)
                scores[head, r0:r0 + chunk] = torch.linalg.vecdot(gathered, queries[head, r0:r0 + chunk, None])
        scores = scores.view(h, b, lq, samples).transpose(0, 1) * softmax_scale(d)  # (B, H, Lq, S)
        used = (torch.arange(samples, device=q.device) < samples_per_row[..., None])[:, None]  # (B, 1, Lq, S)
        peak = scores.masked_fill(~used, float("-inf")).amax(dim=-1)
        mean = scores.masked_fill(~used, 0.0).sum(dim=-1) / samples_per_row[:, None].to(scores.dtype)
        return (peak - mean).masked_fill(~candidate[:, None], float("-inf"))

    def _select(self, m, real_q, candidate):
        """Active rows (B, H, Lq) bool from the measurement M."""
        if self.causal:
            budget = log_budget(self.factor, torch.cumsum(real_q.long(), dim=-1))[:, None]  # (B, 1, Lq)
            return (prefix_rank(m) < budget) & candidate[:, None]
        budget = log_budget(self.factor, real_q.sum(dim=-1))[:, None, None]
        order = torch.sort(m, dim=-1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(m.shape[-1], device=m.device).expand_as(order))
        return (rank < budget) & candidate[:, None]

    def _lazy(self, v, real_k, counts, offset):
        """The output of lazy rows (B, H, Lq, Dv): the mean of V over each row's visible real keys."""
        lq = counts.shape[-1]
        kept = v * real_k[:, None, :, None].to(v.dtype)
        denom = counts.clamp_min(1).to(v.dtype)[:, None, :, None]
        if self.pattern is Pattern.CS:
            position = (torch.arange(lq, device=v.device) + offset).clamp_min(0)
            sums = torch.cumsum(kept, dim=2)[:, :, position]
        else:
            sums = kept.sum(dim=2, keepdim=True)
        return (sums / denom).masked_fill((counts == 0)[:, None, :, None], 0.0)

    def forward(self, q, k, v, key_padding_mask=None):
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        b, h, lq, d = q.shape
        real_k, counts, real_q, offset = self._layout(b, lq, k.shape[-2], key_padding_mask, q.device)
        candidate = real_q & (counts > 0)
        with torch.no_grad():
            active = self._select(self._sparsity(q, k, real_k, counts, candidate), real_q, candidate)
        lazy = self._lazy(v, real_k, counts, offset).expand(b, h, lq, v.shape[-1])
        n_active = active.sum(dim=-1)
        width = int(n_active.max())
        if width == 0:
            return lazy.contiguous()
        rows = torch.argsort((~active).to(torch.int8), dim=-1, stable=True)[..., :width]  # active rows first
        in_use = torch.arange(width, device=q.device) < n_active[..., None]
        q_active = q.gather(2, rows[..., None].expand(b, h, width, d)) * softmax_scale(d)
        scores = q_active @ k.transpose(-1, -2)  # (B, H, width, Lk)
        keep = None if key_padding_mask is None else real_k[:, None, None, :]
        if self.pattern is Pattern.CS:
            future = torch.arange(k.shape[-2], device=q.device) > (rows + offset)[..., None]
            keep = ~future if keep is None else keep & ~future
        if keep is not None:  # every row in use sees a key; the lowest finite score keeps unused slots finite
            scores = scores.masked_fill_(~keep, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1)
        index = rows[..., None].expand(b, h, width, v.shape[-1])
        updates = torch.where(in_use[..., None], probs @ v, lazy.gather(2, index))
        return lazy.scatter(2, index, updates)

    # naive formulation --------------------------------------------------------------------------------

    def reference(self, q, k, v, key_padding_mask=None):
        """Row by row: the row's visible real keys listed explicitly, M from the same hashed samples with an
        explicit max and mean, the selection by an explicit sort (NS, NC) or an explicit count over the
        earlier rows (CS, CC), then a dense softmax row or the plain mean of the visible values."""
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        b, h, lq, d = q.shape
        lk = k.shape[-2]
        pad = torch.zeros(b, lk, dtype=torch.bool) if key_padding_mask is None else key_padding_mask.bool().cpu()
        offset = lk - lq
        scale = softmax_scale(d)
        out = torch.zeros(b, h, lq, v.shape[-1], dtype=v.dtype, device=v.device)
        for bi in range(b):
            real = [j for j in range(lk) if not pad[bi, j]]
            visible = [[j for j in real if self.pattern is not Pattern.CS or j <= i + offset] for i in range(lq)]
            query_real = [self.cross or not (0 <= i + offset < lk) or not bool(pad[bi, i + offset]) for i in range(lq)]
            counts = torch.tensor([[len(vis) for vis in visible]])
            budget = int(log_budget(self.factor, counts).clamp_min(1).max())
            ranks = sample_ranks(self.seed, torch.arange(lq), budget, counts)[0]
            m = torch.full((h, lq), float("-inf"), dtype=torch.float64)
            for i in range(lq):
                n = len(visible[i])
                if n == 0 or not query_real[i]:
                    continue
                taken = [visible[i][r] for r in ranks[i, : max(1, min(n, self.factor * math.ceil(math.log(n))))]]
                with torch.no_grad():
                    s = (k[bi][:, taken] @ q[bi, :, i, :, None]).squeeze(-1).double() * scale  # (H, S)
                m[:, i] = s.max(dim=-1).values - s.mean(dim=-1)
            for hi in range(h):
                active = self._reference_selection(m[hi], query_real)
                for i in range(lq):
                    keys = visible[i]
                    if not keys:
                        continue
                    if i in active:
                        weights = torch.softmax((k[bi, hi, keys] @ q[bi, hi, i]) * scale, dim=0)
                        out[bi, hi, i] = weights @ v[bi, hi, keys]
                    else:
                        out[bi, hi, i] = v[bi, hi, keys].mean(dim=0)
        return out

    def _reference_selection(self, m: torch.Tensor, query_real: "list[bool]") -> "set[int]":
        """The active rows of one (batch, head) given M (-inf where a row may not be active)."""
        def budget(n: int) -> int:
            return min(n, self.factor * math.ceil(math.log(n))) if n > 1 else 0

        rows = range(m.shape[0])
        if not self.causal:
            ranked = sorted(rows, key=lambda i: (-float(m[i]), i))
            return {i for i in ranked[: budget(sum(query_real))] if m[i] > float("-inf")}
        active = set()
        for i in rows:
            earlier_at_least = sum(1 for j in range(i) if m[j] >= m[i])
            if m[i] > float("-inf") and earlier_at_least < budget(sum(query_real[: i + 1])):
                active.add(i)
        return active

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, factor={self.factor}, seed={self.seed}"
