"""Head-level window/full mechanisms on one head-heterogeneous engine (`engine.head_windows`): every head is a
sliding window (cab's `local` convention, plus attention-sink keys) or full softmax attention, statically
per head (MoA M49, DuoAttention M50) or per query token by a router (AHA M47, query-adaptive head selection
M48). Each row runs ONE softmax over its visible set; rows that see no key output 0.

Patterns: NS and CS (a window needs one position axis; query i sits at key position i in NS and
i + Lk - Lq in CS, bottom-right as cab's causal mask). NC/CC are refused: two sequences share no
positions. Routers see only the query token's own per-head query and (M48) its own local scores, so no
query row depends on another query: causal by construction. Routing decisions are hard (a comparison), so
they are not differentiable; gradients flow through the attention of whichever branch each row took.
`computed_pairs` counts the pairs the efficient path scores (window heads: `local`'s blocked count for all
their rows; each full row: Lk), so the bench reports the achieved sparsity.
"""

from __future__ import annotations

import math

import torch

from cab.attention.base import Attention, repeat_kv
from cab.attention.engine import head_windows
from cab.attention.engine.kv_cache import check_step_inputs
from cab.attention.engine.masks import query_offset
from cab.attention.engine.prepare import softmax_scale
from cab.patterns import Pattern
from cab.registry import register_attention

_CROSS = ("a sliding window needs queries and keys on one position axis; two different sequences share "
          "no positions, so the window/full split would rest on an arbitrary alignment")
_UNSUPPORTED = {"NC": _CROSS, "CC": _CROSS}


class _HeadHetero(Attention):
    """Shared plumbing: subclasses give `config(q, k, key_padding_mask)` -> (windows per head, full_rows or
    None); forward runs the engine, reference the explicit mask with the same configuration, except where a
    subclass overrides `reference_config` with a naive recomputation of its router."""

    sinks: int = 0

    def __init__(self, pattern, num_heads, head_dim):
        super().__init__(pattern, num_heads, head_dim)
        self._local_cache: dict = {}

    def config(self, q, k, key_padding_mask):
        raise NotImplementedError

    def reference_config(self, q, k, key_padding_mask):
        return self.config(q, k, key_padding_mask)

    def forward(self, q, k, v, key_padding_mask=None):
        windows, full_rows = self.config(q, k, key_padding_mask)
        return head_windows.hetero_attention(q, k, v, key_padding_mask, self.pattern, windows, self.sinks, full_rows,
                                       self._local_cache)

    def reference(self, q, k, v, key_padding_mask=None):
        windows, full_rows = self.reference_config(q, k, key_padding_mask)
        return head_windows.dense_reference(q, k, v, key_padding_mask, self.pattern, windows, self.sinks, full_rows)

    def computed_pairs(self, q, k, v, key_padding_mask=None):
        with torch.no_grad():
            windows, full_rows = self.config(q, k, key_padding_mask)
            return head_windows.hetero_pairs(q, k, self.pattern, windows, self.sinks, full_rows, self._local_cache)


def _window_from_span(span: float) -> int:
    """cab window half-width w holding `span` keys in CS (w + 1 keys including the query's own)."""
    return max(0, int(math.ceil(span)) - 1)


@register_attention(
    "duo", patterns=("NS", "CS"), family="local", exact=False, mechanism="M50",
    citation="Xiao et al., DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming "
    "Heads, ICLR 2025", unsupported=_UNSUPPORTED,
)
class DuoAttention(_HeadHetero):
    """DuoAttention: retrieval heads run full attention, streaming heads attend the `recent` last keys
    (their own included) plus `sinks` first keys (a constant-length KV cache).

    The paper finds the retrieval heads by optimising a per-head gate on synthetic passkey data; here which
    heads retrieve is the hyper-parameter `retrieval_heads` (query-head indices). Default: the heads
    0, 2, 4, ... (half the heads: the paper's 50% setting for MHA models), sinks 64 and recent 256 (the
    authors' released evaluation settings). Under GQA the split is per query head.

    Decoding (CS): KV heads serving a retrieval head keep a KV cache (`exact.KVCache`); the other KV heads
    keep only the sink tokens and the last `recent` tokens, a constant-size state (the paper's memory
    saving, visible in `decode_state_bytes`). A GQA KV head shared by a retrieval and a streaming query head
    keeps the whole cache, its streaming heads masked to their window.
    """

    def __init__(self, pattern, num_heads, head_dim, retrieval_heads: "tuple | list | None" = None,
                 sinks: int = 64, recent: int = 256):
        super().__init__(pattern, num_heads, head_dim)
        if retrieval_heads is None:
            retrieval_heads = tuple(range(0, num_heads, 2))
        retrieval_heads = tuple(sorted({int(h) for h in retrieval_heads}))
        if any(h < 0 or h >= num_heads for h in retrieval_heads):
            raise ValueError(f"retrieval_heads must lie in 0..{num_heads - 1}, got {retrieval_heads}")
        if sinks < 0 or recent < 1:
            raise ValueError(f"sinks must be >= 0 and recent >= 1, got sinks={sinks}, recent={recent}")
        self.retrieval_heads, self.sinks, self.recent = retrieval_heads, sinks, recent
        self.windows = [None if h in retrieval_heads else recent - 1 for h in range(num_heads)]

    def extra_repr(self):
        return (f"{super().extra_repr()}, retrieval_heads={self.retrieval_heads}, sinks={self.sinks}, "
                f"recent={self.recent}")

    def config(self, q, k, key_padding_mask):
        return self.windows, None

    # decoding (CS): retrieval KV heads keep the whole cache, streaming KV heads sinks + recent only -------

    def _full_kv_heads(self, kv_heads: int) -> "list[bool]":
        """Per KV head: True when one of its query heads is a retrieval head (it needs the whole cache)."""
        group = self.num_heads // kv_heads
        return [any(h in self.retrieval_heads for h in range(g * group, (g + 1) * group)) for g in range(kv_heads)]

    def decode_init(self, k, v, key_padding_mask=None, capacity=None):
        """State after the context k, v (B, Hkv, L0, D): a KVCache of the KV heads serving a retrieval head,
        and for the other KV heads the sink tokens plus the last `recent` tokens (a constant-size cache:
        DuoAttention's memory saving). Under GQA a KV head shared by a retrieval and a streaming query head
        keeps the whole cache."""
        if self.pattern is not Pattern.CS:
            raise ValueError("DuoAttention decodes under CS only")
        from cab.attention.engine.kv_cache import KVCache

        batch, kv_heads, length, _ = k.shape
        real = torch.ones(batch, length, dtype=torch.bool, device=k.device)
        if key_padding_mask is not None:
            real = ~key_padding_mask.to(device=k.device, dtype=torch.bool)
        full = torch.tensor(self._full_kv_heads(kv_heads), device=k.device)
        fidx, sidx = full.nonzero().flatten(), (~full).nonzero().flatten()
        size = max(capacity or 0, length, 1)
        keys = k.new_zeros(batch, fidx.numel(), size, k.shape[-1])
        values = v.new_zeros(batch, fidx.numel(), size, v.shape[-1])
        keys[:, :, :length], values[:, :, :length] = k[:, fidx], v[:, fidx]
        cache_real = real.new_zeros(batch, size)
        cache_real[:, :length] = real
        cache = KVCache(keys, values, length, cache_real)
        s = min(self.sinks, length)
        start = max(s, length - self.recent)
        stream = (k[:, sidx, :s], v[:, sidx, :s], real[:, :s],  # sinks
                  k[:, sidx, start:], v[:, sidx, start:], real[:, start:])  # the recent window
        return {"cache": cache, "stream": stream, "length": length, "full": fidx, "streaming": sidx}

    def decode_step(self, state, q, k=None, v=None):
        check_step_inputs(self, k, v)
        p = state["length"]  # the new token's position
        fidx, sidx = state["full"], state["streaming"]
        cache = state["cache"].append(k[:, fidx], v[:, fidx])
        sk, sv, sreal, rk, rv, rreal = state["stream"]
        one = torch.ones(k.shape[0], 1, dtype=torch.bool, device=k.device)
        if p < self.sinks:
            sk, sv, sreal = torch.cat([sk, k[:, sidx]], 2), torch.cat([sv, v[:, sidx]], 2), torch.cat([sreal, one], 1)
        else:
            drop = max(0, rreal.shape[1] - (self.recent - 1))  # the oldest tokens leave the window
            rk, rv = torch.cat([rk[:, :, drop:], k[:, sidx]], 2), torch.cat([rv[:, :, drop:], v[:, sidx]], 2)
            rreal = torch.cat([rreal[:, drop:], one], 1)
        new_state = {"cache": cache, "stream": (sk, sv, sreal, rk, rv, rreal), "length": p + 1,
                     "full": fidx, "streaming": sidx}
        kv_heads = k.shape[1]
        group = self.num_heads // kv_heads
        full_keys, full_values, full_real = cache.in_use()
        stream_keys, stream_values = torch.cat([sk, rk], 2), torch.cat([sv, rv], 2)
        stream_real = torch.cat([sreal, rreal], 1)
        where_full = {int(g): n for n, g in enumerate(fidx.tolist())}
        where_stream = {int(g): n for n, g in enumerate(sidx.tolist())}
        outs = []
        scale = softmax_scale(q.shape[-1])
        for h in range(self.num_heads):
            g = h // group
            if g in where_full:
                keys, values, real = full_keys[:, where_full[g]], full_values[:, where_full[g]], full_real
                if h not in self.retrieval_heads:  # a streaming head on a shared full cache: its window only
                    pos = torch.arange(keys.shape[1], device=q.device)
                    real = real & ((pos < self.sinks) | (pos > p - self.recent))[None]
            else:
                keys, values, real = stream_keys[:, where_stream[g]], stream_values[:, where_stream[g]], stream_real
            scores = (q[:, h] * scale) @ keys.transpose(-1, -2)  # (B, 1, T)
            probs = torch.softmax(scores.masked_fill(~real[:, None], torch.finfo(scores.dtype).min), -1)
            outs.append((probs * real[:, None].any(-1, keepdim=True)) @ values)
        return torch.stack(outs, 1), new_state


@register_attention(
    "moa", patterns=("NS", "CS"), family="local", exact=False, mechanism="M49",
    citation="Fu et al., MoA: Mixture of Sparse Attention for Automatic Large Language Model Compression, "
    "arXiv 2406.14909 (2024)", unsupported=_UNSUPPORTED,
)
class MixtureOfSparseAttention(_HeadHetero):
    """MoA: every head a sliding window (plus `sinks` first keys) whose span follows the head's elastic rule
    S_h = alpha_h + beta_h * N (paper Sec. 3: spans scale with the input length N).

    N per query row [BG -> EJ]: the number of real keys that row can see (CS: real keys at or before its
    position; NS: all real keys). During causal generation this is exactly the current sequence length the
    paper's rule is applied to, and it keeps the rule leak-free (a row's window never depends on later
    tokens) and padding-invariant. The window holds S_h keys in CS (the query's own included: half-width
    ceil(S_h) - 1; the same half-width on both sides in NS).

    The paper chooses (alpha_h, beta_h) per head and layer by profiling and a multi-objective search; here
    they are the hyper-parameters `alphas` and `betas` (one per query head). No universal default exists;
    the default spreads beta linearly over [0, 0.5] across heads with alpha 64 (a stand-in calibration: some
    heads stay local, others grow with the input) and 4 sinks (StreamingLLM's default).

    Efficient path (`head_windows.banded_attention`): per head, rows in chunks of about the head's window,
    each scoring the contiguous key range its windows cover (O(Lq x (chunk + span)) per head); reference:
    an explicit key set per row.
    """

    def __init__(self, pattern, num_heads, head_dim, alphas: "tuple | list | None" = None,
                 betas: "tuple | list | None" = None, sinks: int = 4):
        super().__init__(pattern, num_heads, head_dim)
        alphas = [64.0] * num_heads if alphas is None else [float(a) for a in alphas]
        if betas is None:
            betas = [0.5 * h / max(1, num_heads - 1) for h in range(num_heads)]
        betas = [float(b) for b in betas]
        if len(alphas) != num_heads or len(betas) != num_heads:
            raise ValueError(f"alphas and betas need one entry per head ({num_heads}), got {len(alphas)}, {len(betas)}")
        if any(a < 1 for a in alphas) or any(b < 0 for b in betas) or sinks < 0:
            raise ValueError("alphas must be >= 1, betas >= 0 and sinks >= 0")
        self.alphas, self.betas, self.sinks = tuple(alphas), tuple(betas), sinks

    def extra_repr(self):
        return f"{super().extra_repr()}, alphas={self.alphas}, betas={self.betas}, sinks={self.sinks}"

    def half_widths(self, q, k, key_padding_mask) -> torch.Tensor:
        """(B, H, Lq) int64 window half-widths ceil(alpha_h + beta_h * N_i) - 1."""
        batch, lq, lk = q.shape[0], q.shape[-2], k.shape[-2]
        ok = torch.ones(batch, lk, dtype=torch.bool, device=q.device)
        if key_padding_mask is not None:
            ok = ~key_padding_mask.bool().to(q.device)
        if self.pattern is Pattern.CS:
            cum = torch.cat([ok.new_zeros(batch, 1, dtype=torch.long), ok.long().cumsum(-1)], -1)
            pos = torch.arange(lq, device=q.device) + lk - lq
            n = cum[:, (pos + 1).clamp(0, lk)]  # (B, Lq)
        else:
            n = ok.long().sum(-1, keepdim=True).expand(batch, lq)
        alphas = torch.tensor(self.alphas, dtype=torch.float64, device=q.device)[None, :, None]
        betas = torch.tensor(self.betas, dtype=torch.float64, device=q.device)[None, :, None]
        return (torch.ceil(alphas + betas * n[:, None].double()) - 1).clamp(min=0).long()

    def forward(self, q, k, v, key_padding_mask=None):
        return head_windows.banded_attention(q, k, v, key_padding_mask, self.pattern,
                                       self.half_widths(q, k, key_padding_mask), self.sinks)

    def reference(self, q, k, v, key_padding_mask=None):
        """Row by row: the explicit key set of each (batch, head, query) and one softmax over it."""
        hw = self.half_widths(q, k, key_padding_mask)
        kk, vv = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        batch, heads, lq, dim = q.shape
        lk = k.shape[-2]
        offset = query_offset(self.pattern, lq, lk)
        rows = []
        for b in range(batch):
            for h in range(heads):
                for i in range(lq):
                    p = i + offset
                    keys = [j for j in range(lk) if (key_padding_mask is None or not bool(key_padding_mask[b, j]))
                            and (self.pattern is not Pattern.CS or j <= p)
                            and (abs(p - j) <= int(hw[b, h, i]) or j < self.sinks)]
                    if not keys:
                        rows.append(q.new_zeros(vv.shape[-1]))
                        continue
                    w = torch.softmax(kk[b, h, keys] @ q[b, h, i] / math.sqrt(dim), 0)
                    rows.append(w @ vv[b, h, keys])
        return torch.stack(rows).view(batch, heads, lq, -1)

    def computed_pairs(self, q, k, v, key_padding_mask=None):
        hw = self.half_widths(q, k, key_padding_mask)
        causal = self.pattern is Pattern.CS
        return head_windows.banded_pairs(q.shape[0], q.shape[1], q.shape[-2], hw, causal, self.sinks, k.shape[-2])


@register_attention(
    "aha", patterns=("NS", "CS"), family="routing", exact=False, mechanism="M47",
    citation="Luo et al., Learning When Not to Attend Globally (All-or-Here Attention), arXiv, December "
    "2025", unsupported=_UNSUPPORTED,
)
class AllOrHereAttention(_HeadHetero):
    """AHA: a binary router per head switches each token between full attention and a sliding window of
    `window` keys (paper default 256).

    Router [BG]: the paper routes from the token's hidden state; an attention operator has only q, k, v, so
    the router of head h reads the token's own query of that head: full iff
    q_h . r_h / sqrt(d) + bias_h > 0, with r_h, bias_h fixed buffers drawn from `seed` (bias from the
    hyper-parameter `bias`, which sets the share of full rows). The paper trains the router with an
    auxiliary objective; that training is outside the operator, so the router is a given, non-trainable map
    and the hard decision has no gradient.
    """

    def __init__(self, pattern, num_heads, head_dim, window: int = 256, bias: float = 0.0, seed: int = 0):
        super().__init__(pattern, num_heads, head_dim)
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window, self.bias, self.seed = window, float(bias), seed
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("router", torch.randn(num_heads, head_dim, generator=gen))
        self.register_buffer("router_bias", torch.full((num_heads,), float(bias)))

    def extra_repr(self):
        return f"{super().extra_repr()}, window={self.window}, bias={self.bias}, seed={self.seed}"

    def route(self, q):
        """(B, H, Lq) bool: rows routed to full attention."""
        r = self.router.to(q.dtype)
        logits = torch.einsum("bhid,hd->bhi", q.detach(), r) * softmax_scale(q.shape[-1])
        return logits + self.router_bias.to(q.dtype)[None, :, None] > 0

    def config(self, q, k, key_padding_mask):
        return [self.window - 1] * self.num_heads, self.route(q)

    def reference_config(self, q, k, key_padding_mask):
        batch, heads, lq, dim = q.shape
        rows = torch.zeros(batch, heads, lq, dtype=torch.bool)
        for b in range(batch):
            for h in range(heads):
                for i in range(lq):
                    logit = float(q[b, h, i].detach() @ self.router[h].to(q.dtype)) / math.sqrt(dim)
                    rows[b, h, i] = logit + float(self.router_bias[h]) > 0
        return [self.window - 1] * heads, rows.to(q.device)


@register_attention(
    "qada", patterns=("NS", "CS"), family="routing", exact=False, mechanism="M48",
    citation="Donhauser et al., Unveiling Simplicities of Attention: Adaptive Long-Context Head "
    "Identification, arXiv 2502.09647 (2025)", unsupported=_UNSUPPORTED,
)
class QueryAdaptiveHeadAttention(_HeadHetero):
    """Query-adaptive long-context head selection (QAdA): per query and head, predict from the local scores
    alone whether the keys outside the local window carry attention mass; if so the row runs full attention,
    otherwise local attention (window of `window` keys plus `sinks` first keys).

    Second-moment model [BG -> EJ]: the scores s_j = q.k_j / sqrt(d) of the n_far visible keys outside the
    local set are modelled as Gaussian with the mean m and variance s2 of the row's window scores (sinks
    excluded: they are outliers), so their total mass is estimated as n_far * exp(m + s2 / 2). The row goes
    full iff that estimated far mass is more than `threshold` of the estimated total, i.e.
    log n_far + m + s2/2 - logsumexp(local scores) > logit(threshold). Only the row's own query and local
    keys are read (plus the count of visible keys), so the decision is causal. Defaults (window 128, sinks 4,
    threshold 0.5) are stand-ins: the paper sweeps the threshold to trade accuracy for FLOPs.
    """

    def __init__(self, pattern, num_heads, head_dim, window: int = 128, sinks: int = 4, threshold: float = 0.5):
        super().__init__(pattern, num_heads, head_dim)
        if window < 1 or sinks < 0 or not 0.0 < threshold < 1.0:
            raise ValueError("window must be >= 1, sinks >= 0 and 0 < threshold < 1")
        self.window, self.sinks, self.threshold = window, sinks, float(threshold)

    def extra_repr(self):
        return f"{super().extra_repr()}, window={self.window}, sinks={self.sinks}, threshold={self.threshold}"

    def _half_width(self) -> int:
        return self.window - 1

    def config(self, q, k, key_padding_mask):
        return [self._half_width()] * self.num_heads, self.route(q, k, key_padding_mask)

    def route(self, q, k, key_padding_mask):
        """(B, H, Lq) bool decisions, vectorised over heads: rows in chunks of about the window, each chunk
        scoring the contiguous key range its windows cover by one matmul (O(Lq x (chunk + window)))."""
        with torch.no_grad():
            q, k = q.detach(), repeat_kv(k.detach(), q.shape[1])
            batch, heads, lq, dim = q.shape
            lk = k.shape[-2]
            w, s = self._half_width(), min(self.sinks, lk)
            causal = self.pattern is Pattern.CS
            offset = lk - lq if causal else 0
            ok = torch.ones(batch, lk, dtype=torch.bool, device=q.device)
            if key_padding_mask is not None:
                ok = ~key_padding_mask.bool().to(q.device)
            cum = torch.cat([ok.new_zeros(batch, 1, dtype=torch.long), ok.long().cumsum(-1)], -1)
            q = q * softmax_scale(dim)
            key_pos = torch.arange(lk, device=q.device)
            neg = torch.finfo(q.dtype).min
            widths = torch.full((lq,), w, dtype=torch.long)
            out = []
            for r0, r1, lo, hi in head_windows.band_chunks(lq, lk, widths, causal):
                pos = torch.arange(r0, r1, device=q.device) + offset
                gap = pos[:, None] - key_pos[None, lo:hi]
                near = (gap >= 0) & (gap <= w) if causal else gap.abs() <= w
                win = near[None] & ok[:, None, lo:hi] & (key_pos[lo:hi] >= s)[None, None]  # (B, r, K)
                sw = q[:, :, r0:r1] @ k[:, :, lo:hi].transpose(-1, -2)  # (B, H, r, K)
                sink_vis = ok[:, None, :s] & ((key_pos[None, :s] <= pos[:, None]) if causal else True)
                sink_vis = sink_vis.expand(batch, r1 - r0, s)
                sink_scores = q[:, :, r0:r1] @ k[:, :, :s].transpose(-1, -2)  # (B, H, r, s)
                local = torch.cat([sw.masked_fill(~win[:, None], neg),
                                   sink_scores.masked_fill(~sink_vis[:, None], neg)], -1)
                n_local = win.sum(-1) + sink_vis.sum(-1)  # (B, r)
                if causal:
                    n_visible = cum[:, (pos + 1).clamp(0, lk)]
                else:
                    n_visible = cum[:, -1:].expand(-1, r1 - r0)
                n_far = (n_visible - n_local).to(sw.dtype)[:, None]  # (B, 1, r)
                n_win = win.sum(-1).to(sw.dtype)[:, None]
                wm = win[:, None].to(sw.dtype)
                mean = (sw * wm).sum(-1) / n_win.clamp(min=1)
                var = (((sw - mean[..., None]) ** 2) * wm).sum(-1) / n_win.clamp(min=1)
                lse = torch.logsumexp(local, -1)
                far = torch.log(n_far.clamp(min=1)) + mean + var / 2
                go = (far - lse > math.log(self.threshold / (1 - self.threshold))) & (n_far > 0) & (n_win > 0)
                out.append(go)
            return torch.cat(out, -1)

    def reference_config(self, q, k, key_padding_mask):
        """The decisions by a loop over rows with explicit key sets."""
        q, k = q.detach(), repeat_kv(k.detach(), q.shape[1])
        batch, heads, lq, dim = q.shape
        lk = k.shape[-2]
        w, causal = self._half_width(), self.pattern is Pattern.CS
        offset = lk - lq if causal else 0
        rows = torch.zeros(batch, heads, lq, dtype=torch.bool)
        logit = math.log(self.threshold / (1 - self.threshold))
        for b in range(batch):
            real = [j for j in range(lk) if key_padding_mask is None or not bool(key_padding_mask[b, j])]
            for i in range(lq):
                p = i + offset
                visible = [j for j in real if not causal or j <= p]
                window = [j for j in visible if abs(p - j) <= w and j >= self.sinks]
                sinks = [j for j in visible if j < self.sinks]
                local = sorted(set(window) | set(sinks))
                n_far = len(visible) - len(local)
                if n_far == 0 or not window:
                    continue
                for h in range(heads):
                    sc = (k[b, h] @ q[b, h, i]) / math.sqrt(dim)
                    ws = sc[window]
                    m, var = float(ws.mean()), float(((ws - ws.mean()) ** 2).mean())
                    rows[b, h, i] = math.log(n_far) + m + var / 2 - float(torch.logsumexp(sc[local], 0)) > logit
        return [w] * heads, rows.to(q.device)
