"""MoH: multi-head attention as a mixture of heads (Jin et al., 2024), as an attention operator."""

from __future__ import annotations

import math

import torch
from torch import nn

from cab.attention.base import Attention, repeat_kv
from cab.attention.engine import head_windows
from cab.attention.engine.scores import masked_softmax_attention
from cab.registry import register_attention


@register_attention(
    "moh", patterns=("NS", "CS", "NC", "CC"), family="routing", exact=False, mechanism="M6",
    citation="Jin, Zhu, Yuan and Yan, MoH: Multi-Head Attention as Mixture-of-Head Attention, arXiv, "
    "October 2024",
)
class MixtureOfHeadAttention(Attention):
    """Mixture-of-Head attention: each token activates the `shared_heads` shared heads plus its top-`top_k`
    routed heads; head h's output at token i is scaled by the gate g_{i,h}, and an unselected head outputs 0
    for that token (MoH Eq. 5-6):

        g_{i,h} = a1_i * softmax(W_s x_i)_h                 shared heads (h < shared_heads)
        g_{i,h} = a2_i * softmax(W_r x_i)_h  if h in TopK    routed heads (softmax over all routed heads)
        [a1_i, a2_i] = softmax(W_h x_i)                     (both 1 where one kind of head is absent)

    What the router sees [BG -> EJ]: the paper routes from the token's hidden state x_i; an attention
    operator receives only q, k, v, so x_i here is the token's own per-head queries concatenated,
    (q_{i,1}, ..., q_{i,Hq}) of size Hq * D (a linear image of the hidden state). It reads no other token, so
    the routing is causal by construction in every pattern (query row i depends on query i only, and on
    keys only through the heads' attention). Inside each head: exact softmax attention under the pattern
    (CS bottom-right aligned for Lq != Lk; NC/CC see every key). The heads' output projection is outside
    the operator: the gated head outputs are returned per head, (B, Hq, Lq, Dv).

    Parameters: W_s (shared x Hq D), W_r (routed x Hq D), W_h (2 x Hq D), learned, initialised from `seed`
    (normal, std 1/sqrt(Hq D)). Defaults follow MoH-LLaMA3: half the heads shared, and top_k half of the
    routed ones, so 75% of the heads are active per token. The top-k choice is not differentiable; gates
    are (through the softmaxes), so W_s, W_r, W_h and q get gradients.

    Efficient path: per (batch, head) only the rows that activate the head are gathered and scored against
    that head's keys (`head_windows.full_row_outputs`), so an inactive (token, head) pair costs nothing;
    `computed_pairs` = active rows x Lk. Reference: every head densely, times the gates.
    """

    mixes_heads = True  # heads are routed and weighted per token from all heads' queries

    def __init__(self, pattern, num_heads, head_dim, shared_heads: "int | None" = None,
                 top_k: "int | None" = None, seed: int = 0):
        super().__init__(pattern, num_heads, head_dim)
        shared = num_heads // 2 if shared_heads is None else int(shared_heads)
        routed = num_heads - shared
        top_k = routed // 2 if top_k is None else int(top_k)
        if not 0 <= shared <= num_heads or not 0 <= top_k <= routed or shared + top_k < 1:
            raise ValueError(f"need 0 <= shared_heads <= heads, 0 <= top_k <= routed heads and at least one "
                             f"active head; got shared_heads={shared}, top_k={top_k}, heads={num_heads}")
        self.shared_heads, self.top_k, self.seed = shared, top_k, seed
        width = num_heads * head_dim
        gen = torch.Generator().manual_seed(seed)
        std = 1.0 / math.sqrt(width)
        self.w_shared = nn.Parameter(torch.randn(shared, width, generator=gen) * std)
        self.w_routed = nn.Parameter(torch.randn(routed, width, generator=gen) * std)
        self.w_mix = nn.Parameter(torch.randn(2, width, generator=gen) * std)

    def extra_repr(self):
        return f"{super().extra_repr()}, shared_heads={self.shared_heads}, top_k={self.top_k}, seed={self.seed}"

    def gates(self, q: torch.Tensor) -> torch.Tensor:
        """(B, Hq, Lq) gate of every (token, head); 0 for an unselected routed head."""
        batch, heads, lq, dim = q.shape
        x = q.transpose(1, 2).reshape(batch, lq, heads * dim)
        routed = heads - self.shared_heads
        parts = []
        if self.shared_heads and routed:
            mix = torch.softmax(x @ self.w_mix.to(x.dtype).T, -1)  # (B, Lq, 2)
            a1, a2 = mix[..., :1], mix[..., 1:]
        else:
            a1 = a2 = 1.0
        if self.shared_heads:
            parts.append(a1 * torch.softmax(x @ self.w_shared.to(x.dtype).T, -1))
        if routed:
            logits = x @ self.w_routed.to(x.dtype).T  # (B, Lq, routed)
            chosen = torch.zeros_like(logits, dtype=torch.bool)
            if self.top_k:
                chosen.scatter_(-1, logits.detach().topk(self.top_k, -1).indices, True)
            parts.append(a2 * torch.softmax(logits, -1) * chosen)
        return torch.cat(parts, -1).transpose(1, 2)

    def active(self, q: torch.Tensor) -> torch.Tensor:
        """(B, Hq, Lq) bool: the (token, head) pairs that run attention."""
        batch, heads, lq, dim = q.shape
        with torch.no_grad():
            rows = torch.ones(batch, heads, lq, dtype=torch.bool, device=q.device)
            routed = heads - self.shared_heads
            if routed:
                x = q.detach().transpose(1, 2).reshape(batch, lq, heads * dim)
                logits = x @ self.w_routed.to(x.dtype).T
                chosen = torch.zeros_like(logits, dtype=torch.bool)
                if self.top_k:
                    chosen.scatter_(-1, logits.topk(self.top_k, -1).indices, True)
                rows[:, self.shared_heads:] = chosen.transpose(1, 2)
            return rows

    def forward(self, q, k, v, key_padding_mask=None):
        heads = q.shape[1]
        k, v = repeat_kv(k, heads), repeat_kv(v, heads)
        out = head_windows.full_row_outputs(q, k, v, key_padding_mask, self.pattern, self.active(q))
        return out * self.gates(q)[..., None]

    def reference(self, q, k, v, key_padding_mask=None):
        """Every head densely (eager masked softmax), times the gates."""
        heads = masked_softmax_attention(self, q, k, v, key_padding_mask)
        return heads * self.gates(q)[..., None]

    def computed_pairs(self, q, k, v, key_padding_mask=None):
        return head_windows.full_row_pairs(self.active(q), q.shape[-2], k.shape[-2], self.pattern)
