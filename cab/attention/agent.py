"""Agent Attention: n_a agent tokens first aggregate the keys and values (agent aggregation), then broadcast
them back to the queries (agent broadcast), two softmax attentions through an n_a-token bottleneck, plus
a depthwise convolution of the values; causal patterns with learned agents and prefix sums."""

from __future__ import annotations

import torch
from torch import nn

from cab.attention.base import Attention, repeat_kv
from cab.attention.engine.convolution import depthwise_conv, depthwise_conv_reference
from cab.attention.engine.feature_map import seeded_normal, shifted_exp
from cab.attention.engine.kv_cache import check_step_inputs
from cab.attention.engine.prefix_sums import causal_products, causal_products_flops
from cab.attention.engine.prepare import compute_dtype, key_weights, nonzero, prepare, softmax_scale
from cab.patterns import Pattern, attention_mask
from cab.registry import register_attention


def pooling_matrix(lq: int, agents: int, real: "torch.Tensor | None", device, dtype) -> torch.Tensor:
    """(B|1, n_a, Lq) averaging weights of adaptive average pooling into n_a bins (bin a covers ranks
    floor(a n / n_a) .. ceil((a + 1) n / n_a) - 1, as torch's adaptive_avg_pool1d), over the ranks of the
    real positions when `real` (B, Lq) bool is given (so padded positions take no part, and a padded
    sequence pools exactly like the same sequence without its padding)."""
    if real is None:
        rank = torch.arange(lq, device=device)[None, :]
        count = torch.full((1, 1), lq, device=device)
        ok = torch.ones(1, lq, dtype=torch.bool, device=device)
    else:
        rank = real.long().cumsum(dim=-1) - 1
        count = real.sum(dim=-1, keepdim=True)
        ok = real
    a = torch.arange(agents, device=device)[None, :, None]
    n = count[:, :, None]
    start = torch.div(a * n, agents, rounding_mode="floor")
    stop = torch.div((a + 1) * n + agents - 1, agents, rounding_mode="floor")
    member = (rank[:, None, :] >= start) & (rank[:, None, :] < stop) & ok[:, None, :]
    weights = member.to(dtype)
    return weights / nonzero(weights.sum(dim=-1, keepdim=True))


@register_attention(
    "agent", patterns=("NS", "CS", "NC", "CC"), family="linear", exact=False, mechanism="M21",
    citation="Han et al., Agent Attention: On the Integration of Softmax and Linear Attention, ECCV 2024",
)
class AgentAttention(Attention):
    """Agent Attention (paper Sec. 3.2, Eq. 3-4): with agent tokens A (n_a x d) and s = 1/sqrt(d),

        V_A = softmax(A K^T s) V          (agent aggregation, softmax over the visible keys)
        O   = softmax(Q A^T s) V_A + DWC(V)  (agent broadcast, softmax over the agents)

    Noncausal (NS, NC), as in the paper: A is pooled from the queries by adaptive average pooling to
    n_a = `num_agents` tokens (paper default 49, its 7 x 7 agents; in NS the padded positions are left
    out of the pooling, as their queries are padding too). Pooling from Q makes every row depend on every
    query, so the causal patterns use a sound variant [EJ]: n_a learned agent tokens per head (seeded,
    `seed`), from which CC is query-causal as is (every row reads the same V_A), and CS takes the agent
    aggregation over each row's prefix, V_A,t[a] = sum_{j<=t} exp(s a.k_j) v_j / sum_{j<=t} exp(s a.k_j),
    which is a linear attention with feature maps softmax(q A^T s) / Z_t and exp(s k A^T) (chunked prefix
    products, no L x L tensor; the detached per-agent shift cancels), bottom-right aligned when Lq != Lk.

    DWC(V) is the paper's depthwise convolution restoring feature diversity, here 1-D with `dwc_kernel`
    taps (paper 3; 0 disables) per head and channel, learned (seeded): centred in NS, causal (taps i-2..i)
    in CS; the cross patterns have no shared position axis, so it is omitted there. The paper's agent
    bias (position bias tables sized for 2-D windows) is left out [EJ]. Padded keys take no part in the
    aggregation and no convolution tap; a row with no visible key outputs 0. Decoding (CS) keeps per-agent
    running sums under a running maximum plus the last dwc_kernel - 1 values; CC keeps V_A.
    """

    complexity = {"time": 1, "memory": 1}

    def __init__(self, pattern, num_heads, head_dim, num_agents: int = 49, dwc_kernel: int = 3, seed: int = 0):
        super().__init__(pattern, num_heads, head_dim)
        if num_agents < 1 or dwc_kernel < 0 or (dwc_kernel and dwc_kernel % 2 == 0):
            raise ValueError(f"num_agents must be positive and dwc_kernel 0 or odd, got {num_agents}, {dwc_kernel}")
        self.num_agents, self.dwc_kernel, self.seed = num_agents, dwc_kernel, seed
        self.agents = None
        if self.causal:
            self.agents = nn.Parameter(seeded_normal((num_heads, num_agents, head_dim), seed, 1.0, salt=1))
        self.dwc = None
        if dwc_kernel and not self.cross:
            self.dwc = nn.Parameter(seeded_normal((num_heads, head_dim, dwc_kernel), seed, 0.3, salt=2))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_agents={self.num_agents}, dwc_kernel={self.dwc_kernel}, seed={self.seed}"

    def _pooled_agents(self, q: torch.Tensor, key_padding_mask) -> torch.Tensor:
        real = None
        if self.pattern is Pattern.NS and key_padding_mask is not None and key_padding_mask.shape[-1] == q.shape[-2]:
            real = ~key_padding_mask.bool()
        return pooling_matrix(q.shape[-2], self.num_agents, real, q.device, q.dtype).unsqueeze(1) @ q  # (B, H, n_a, d)

    def _local(self, v, key_padding_mask, lq, reference=False):
        real = key_weights(key_padding_mask, v.shape[0], v.shape[-2], v.device, v.dtype)
        conv = depthwise_conv_reference if reference else depthwise_conv
        out = conv(v * real, self.dwc, causal=self.causal)[:, :, :lq]
        if out.shape[-2] < lq:
            out = torch.nn.functional.pad(out, (0, 0, 0, lq - out.shape[-2]))
        return out

    def forward(self, q, k, v, key_padding_mask=None):
        q, k, v, key_padding_mask, drop, out_dtype = prepare(self, q, k, v, key_padding_mask)
        dtype = q.dtype
        scale = softmax_scale(q.shape[-1])
        agents = self.agents.to(dtype).unsqueeze(0) if self.causal else self._pooled_agents(q, key_padding_mask)
        e = shifted_exp(k @ agents.transpose(-1, -2) * scale, key_padding_mask)  # (B, H, Lk, n_a)
        broadcast = torch.softmax(q @ agents.transpose(-1, -2) * scale, dim=-1)  # (B, H, Lq, n_a)
        if self.pattern is Pattern.CS:
            out = causal_products(broadcast / nonzero(e.cumsum(dim=-2)), e, v)
        else:
            values = (e.transpose(-1, -2) @ v) / nonzero(e.sum(dim=-2).unsqueeze(-1))  # V_A (B, H, n_a, dv)
            out = broadcast @ values
        if self.dwc is not None:
            out = out + self._local(v, key_padding_mask, q.shape[-2])
        return out[:, :, drop:].to(out_dtype)

    def reference(self, q, k, v, key_padding_mask=None):
        """Dense form: for every row the agent aggregation as an explicit softmax of A k_j^T over the keys
        the row sees (all of them, or in CS its prefix), (B, H, Lq, n_a, Lk); the broadcast softmax over the
        agents; pooled agents as an explicit loop over the bins; DWC by a loop over the taps."""
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        lq, lk = q.shape[-2], k.shape[-2]
        scale = q.shape[-1] ** -0.5
        if self.causal:
            agents = self.agents.to(q.dtype).unsqueeze(0)
        else:
            pooled = []
            for b in range(q.shape[0]):
                rows = list(range(lq))
                if self.pattern is Pattern.NS and key_padding_mask is not None and key_padding_mask.shape[-1] == lq:
                    rows = [i for i in rows if not bool(key_padding_mask[b, i])]
                n, na = len(rows), self.num_agents
                bins = [rows[(a * n) // na: -(-((a + 1) * n) // na)] for a in range(na)]
                pooled.append(torch.stack([q[b][:, idx].mean(dim=-2) if idx else q.new_zeros(q.shape[1], q.shape[-1])
                                           for idx in bins], dim=-2))  # (H, n_a, d)
            agents = torch.stack(pooled)
        visible = attention_mask(self.pattern, lq, lk, key_padding_mask, q.device)[:, :, :, None, :]
        logits = (agents @ k.transpose(-1, -2) * scale).unsqueeze(2)  # (B, H, 1, n_a, Lk)
        aggregation = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
        aggregation = torch.where(visible.any(dim=-1, keepdim=True), aggregation, torch.zeros_like(aggregation))
        values = aggregation @ v.unsqueeze(2)  # (B, H, Lq, n_a, dv)
        weights = torch.softmax(q @ agents.transpose(-1, -2) * scale, dim=-1)  # (B, H, Lq, n_a)
        out = (weights.unsqueeze(-2) @ values).squeeze(-2)
        if self.dwc is not None:
            if self.pattern is Pattern.CS and lq != lk:
                real = key_weights(key_padding_mask, v.shape[0], lk, v.device, v.dtype)
                local = depthwise_conv_reference(v * real, self.dwc, causal=True)
                local = local[:, :, lk - lq:] if lq <= lk else torch.nn.functional.pad(local, (0, 0, lq - lk, 0))
            else:
                local = self._local(v, key_padding_mask, lq, reference=True)
            out = out + local
        return out

    def algorithmic_flops(self, batch, lq, lk, kv_heads):
        h, d, na = self.num_heads, self.head_dim, self.num_agents
        conv = 2 * batch * h * d * self.dwc_kernel if self.dwc is not None else 0
        if self.pattern is Pattern.CS:
            length = max(lq, lk)
            return 2 * batch * h * 2 * length * d * na + causal_products_flops(batch, h, length, na, d) + conv * length
        flops = 2 * batch * h * (lk * d * na + lq * d * na + na * lk * d + lq * na * d)
        if not self.causal:
            flops += 2 * batch * h * na * lq * d  # pooling the agents from the queries
        return flops + conv * lk

    # decoding -------------------------------------------------------------------------------------------

    def decode_init(self, k, v, key_padding_mask=None, capacity=None):
        """CS: {num (B, H, n_a, dv) = sum exp(s A k - m) v, den (B, H, n_a), m the running per-agent maximum,
        tail: the last dwc_kernel - 1 values}. CC: {values: V_A}."""
        if not self.causal:
            raise ValueError(f"incremental decoding applies to CS and CC, not {self.pattern.value}")
        dtype = compute_dtype(k.dtype)
        k, v = repeat_kv(k, self.num_heads).to(dtype), repeat_kv(v, self.num_heads).to(dtype)
        agents = self.agents.to(dtype).unsqueeze(0)
        logits = k @ agents.transpose(-1, -2) * softmax_scale(k.shape[-1])  # (B, H, L0, n_a)
        if self.cross:
            e = shifted_exp(logits, key_padding_mask)
            return {"values": (e.transpose(-1, -2) @ v) / nonzero(e.sum(dim=-2).unsqueeze(-1))}
        if key_padding_mask is not None:
            logits = logits.masked_fill(key_padding_mask.bool()[:, None, :, None], float("-inf"))
        if k.shape[-2]:
            m = logits.amax(dim=-2)
        else:
            m = k.new_full((k.shape[0], self.num_heads, self.num_agents), float("-inf"))
        safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        e = torch.exp(logits - safe.unsqueeze(-2))
        state = {"num": e.transpose(-1, -2) @ v, "den": e.sum(dim=-2), "m": m}
        if self.dwc is not None:
            taps = self.dwc_kernel - 1
            vr = v * key_weights(key_padding_mask, v.shape[0], v.shape[-2], v.device, dtype)
            tail = vr[:, :, max(0, vr.shape[-2] - taps):]
            state["tail"] = torch.nn.functional.pad(tail, (0, 0, taps - tail.shape[-2], 0))
        return state

    def decode_step(self, state, q, k=None, v=None):
        out_dtype = q.dtype
        dtype = compute_dtype(q.dtype)
        q = q.to(dtype)
        agents = self.agents.to(dtype).unsqueeze(0)
        scale = softmax_scale(q.shape[-1])
        broadcast = torch.softmax(q @ agents.transpose(-1, -2) * scale, dim=-1)  # (B, H, 1, n_a)
        check_step_inputs(self, k, v)
        if self.cross:
            return (broadcast @ state["values"]).to(out_dtype), state
        k, v = repeat_kv(k, self.num_heads).to(dtype), repeat_kv(v, self.num_heads).to(dtype)
        logit = (k @ agents.transpose(-1, -2) * scale)[:, :, 0]  # (B, H, n_a)
        m = torch.maximum(state["m"], logit)
        decay = torch.exp(state["m"] - m)
        e = torch.exp(logit - m)
        num = decay.unsqueeze(-1) * state["num"] + e.unsqueeze(-1) * v
        den = decay * state["den"] + e
        out = (broadcast / den.unsqueeze(-2)) @ num
        new = {"num": num, "den": den, "m": m}
        if self.dwc is not None:
            window = torch.cat([state["tail"], v], dim=-2)
            out = out + (window * self.dwc.to(dtype).permute(0, 2, 1)).sum(dim=-2).unsqueeze(-2)
            new["tail"] = window[:, :, 1:].clone()
        return out.to(out_dtype), new
