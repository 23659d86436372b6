"""Efficient Monotonic Multihead Attention (M63): the expected monotonic alignment of each target step over
a source read left to right, computed in closed form with a numerically stable transition matrix, plus
infinite-lookback soft attention up to the expected stopping point."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cab.attention.base import Attention, repeat_kv
from cab.attention._routing_util import real_keys
from cab.attention.functional import compute_dtype, softmax_scale
from cab.registry import register_attention

_SELF = ("monotonic alignment aligns a target sequence to a separate source read left to right; on one "
         "sequence the alignment of a token to its own prefix is not the mechanism")


@dataclass(frozen=True)
class MonotonicState:
    """Decoding state (CC): the source memory and the alignment of the last decoded target step."""

    keys: torch.Tensor
    values: torch.Tensor
    padding: "torch.Tensor | None"
    alignment: torch.Tensor  # (B, H, Lk)


@register_attention(
    "emma", patterns=("NC", "CC"), family="cross", exact=False, mechanism="M63",
    citation="Ma et al., Efficient Monotonic Multihead Attention, arXiv 2312.04515 (2023); "
    "Raffel et al., Online and Linear-Time Attention by Enforcing Monotonic Alignments, ICML 2017; "
    "Arivazhagan et al., Monotonic Infinite Lookback Attention (MILk), ACL 2019",
    unsupported={"NS": _SELF, "CS": _SELF},
)
class MonotonicAttention(Attention):
    """Expected monotonic alignment with infinite lookback (EMMA's training-time operator).

    Stopping probability p_ij = sigmoid(q_i.k_j / sqrt(d) + r_h) (r_h a learned per-head energy bias,
    initialised to `energy_bias`, Raffel et al.'s -4). Alignment (Raffel et al. eq. 9):
    alpha_ij = p_ij sum_{k<=j} alpha_{i-1,k} prod_{l=k}^{j-1} (1 - p_il), alpha_0 = one-hot at the first
    source position. EMMA's closed form: alpha_i = p_i * (alpha_{i-1} T_i) with the upper-triangular
    transition T_i[k, j] = exp(S_j - S_k), S the exclusive cumulative sum of log(1 - p_i) = logsigmoid(-e),
    which never divides by a vanishing cumulative product (the instability EMMA removes). Unbiased
    estimation: the last real source key has p = 1, so every step stops somewhere and alpha_i sums to 1
    (EMMA's treatment of the source end; [BG]). Padded keys have p = 0 and are passed over.
    Soft attention (MILk): beta_ij = exp(u_ij) sum_{k>=j} alpha_ik / sum_{l<=k} exp(u_il) with u the same
    scaled scores (one energy for both roles, since cab's operator is given one q and k; the paper has two
    projections), output beta_i V. EMMA's variance-reduction and latency losses are training regularisers,
    not part of the operator.

    Target step i depends on steps before it only (the recursion runs forward over queries): causal cross
    (CC) holds by construction, and CC decoding carries the previous alignment. NC is the same operator.
    Cost: a loop over the Lq target steps, each O(Lk^2) for the transition matrix — the closed form buys
    stability and parallelism over the source, not sub-quadratic time.
    """

    complexity = {"time": 3, "memory": 2}

    def __init__(self, pattern, num_heads, head_dim, energy_bias: float = -4.0):
        super().__init__(pattern, num_heads, head_dim)
        self.energy_bias = nn.Parameter(torch.full((num_heads,), float(energy_bias)))

    def _energies(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return (q @ k.transpose(-1, -2)) * softmax_scale(q.shape[-1])

    @staticmethod
    def _stop_logs(energy: torch.Tensor, real: torch.Tensor, last: torch.Tensor
                   ) -> "tuple[torch.Tensor, torch.Tensor]":
        """(log p, log(1 - p)) of one step's monotonic energies (B, H, Lk): padded keys never stop, the last
        real key always does."""
        log_p = F.logsigmoid(energy).masked_fill(~real, float("-inf")).masked_fill(last, 0.0)
        log_q = F.logsigmoid(-energy).masked_fill(~real | last, 0.0)
        return log_p, log_q

    def _step(self, alignment: torch.Tensor, scores: torch.Tensor, real: torch.Tensor, last: torch.Tensor,
              values: torch.Tensor) -> "tuple[torch.Tensor, torch.Tensor]":
        """(output (B, H, Dv), alignment (B, H, Lk)) of one target step from the previous alignment."""
        log_p, log_q = self._stop_logs(scores + self.energy_bias.to(scores.dtype)[None, :, None], real, last)
        s = F.pad(log_q.cumsum(dim=-1)[..., :-1], (1, 0))  # exclusive: S_j = sum_{l<j} log(1 - p_l)
        lk = scores.shape[-1]
        upper = torch.ones(lk, lk, dtype=torch.bool, device=scores.device).triu()
        transition = torch.exp((s.unsqueeze(-2) - s.unsqueeze(-1)).masked_fill(~upper, float("-inf")))
        alignment = torch.exp(log_p) * (alignment.unsqueeze(-2) @ transition).squeeze(-2)
        # infinite lookback: softmax over the prefix ending at each possible stop, weighted by alignment
        u = scores.masked_fill(~real, float("-inf"))
        shift = u.detach().amax(dim=-1, keepdim=True)
        shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
        w = torch.exp(u - shift)
        z = w.cumsum(dim=-1)
        ratio = torch.where(z > 0, alignment / torch.where(z > 0, z, torch.ones_like(z)), torch.zeros_like(z))
        beta = w * ratio.flip(-1).cumsum(dim=-1).flip(-1)
        return (beta.unsqueeze(-2) @ values).squeeze(-2), alignment

    @staticmethod
    def _real_and_last(padding: "torch.Tensor | None", batch: int, lk: int, device) -> "tuple[torch.Tensor, torch.Tensor]":
        real = real_keys(batch, lk, padding, device)
        index = torch.arange(lk, device=device).expand(batch, lk)
        last_index = torch.where(real, index, torch.full_like(index, -1)).amax(dim=-1, keepdim=True)
        return real[:, None, :], (index == last_index)[:, None, :]

    @staticmethod
    def _initial(batch: int, heads: int, lk: int, like: torch.Tensor) -> torch.Tensor:
        start = like.new_zeros(batch, heads, lk)
        start[..., 0] = 1.0
        return start

    def forward(self, q, k, v, key_padding_mask=None):
        out_dtype, dtype = q.dtype, compute_dtype(q.dtype)
        q = q.to(dtype)
        k, v = repeat_kv(k, q.shape[1]).to(dtype), repeat_kv(v, q.shape[1]).to(dtype)
        b, h, lq, _ = q.shape
        lk = k.shape[-2]
        if lk == 0:
            return q.new_zeros(b, h, lq, v.shape[-1]).to(out_dtype)
        real, last = self._real_and_last(key_padding_mask, b, lk, q.device)
        scores = self._energies(q, k)
        alignment, rows = self._initial(b, h, lk, q), []
        for i in range(lq):
            out, alignment = self._step(alignment, scores[:, :, i], real, last, v)
            rows.append(out)
        return torch.stack(rows, dim=2).to(out_dtype)

    def reference(self, q, k, v, key_padding_mask=None):
        """Raffel et al.'s recurrence source position by source position (c_ij = (1 - p_i,j-1) c_i,j-1 +
        alpha_i-1,j; alpha_ij = p_ij c_ij), and MILk's beta as the alignment-weighted sum, over every stop
        position, of softmax over the keys up to that stop."""
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        b, h, lq, d = q.shape
        lk = k.shape[-2]
        real = torch.ones(b, lk, dtype=torch.bool) if key_padding_mask is None else ~key_padding_mask.bool()
        last = [max((j for j in range(lk) if real[bi, j]), default=-1) for bi in range(b)]
        energy = (q @ k.transpose(-1, -2)) / d ** 0.5  # (B, H, Lq, Lk)
        outputs = []
        prev = [q.new_zeros(b, h) for _ in range(lk)]
        prev[0] = q.new_ones(b, h)
        for i in range(lq):
            alpha, carry = [], None
            for j in range(lk):
                p = torch.sigmoid(energy[:, :, i, j] + self.energy_bias)
                p = torch.where(real[:, j, None], p, torch.zeros_like(p))
                is_last = torch.tensor([last[bi] == j for bi in range(b)])[:, None]
                p = torch.where(is_last, torch.ones_like(p), p)
                carry = prev[j] if j == 0 else (1 - p_prev) * carry + prev[j]
                alpha.append(p * carry)
                p_prev = p
            row = q.new_zeros(b, h, v.shape[-1])
            for stop in range(lk):
                visible = real[:, None, :stop + 1]
                if not bool(visible.any()):
                    continue
                weights = torch.softmax(energy[:, :, i, :stop + 1].masked_fill(~visible, float("-inf")), dim=-1)
                weights = torch.nan_to_num(weights)  # batch rows with no real key up to `stop` (alpha is 0)
                row = row + alpha[stop][..., None] * (weights.unsqueeze(-2) @ v[:, :, :stop + 1]).squeeze(-2)
            outputs.append(row)
            prev = alpha
        return torch.stack(outputs, dim=2)

    def decode_init(self, k, v, key_padding_mask=None, capacity=None):
        if self.pattern.value != "CC":
            raise ValueError("incremental decoding applies to causal cross (CC)")
        b, lk = k.shape[0], k.shape[-2]
        return MonotonicState(k, v, key_padding_mask, self._initial(b, self.num_heads, lk, k.to(compute_dtype(k.dtype))))

    def decode_step(self, state, q, k=None, v=None):
        if k is not None or v is not None:
            raise ValueError("causal cross decoding attends a fixed memory: pass only the query")
        dtype = compute_dtype(q.dtype)
        keys = repeat_kv(state.keys, q.shape[1]).to(dtype)
        values = repeat_kv(state.values, q.shape[1]).to(dtype)
        b, lk = keys.shape[0], keys.shape[-2]
        if lk == 0:
            return q.new_zeros(b, q.shape[1], 1, values.shape[-1]), state
        real, last = self._real_and_last(state.padding, b, lk, q.device)
        scores = self._energies(q.to(dtype), keys)[:, :, 0]
        out, alignment = self._step(state.alignment, scores, real, last, values)
        return out.unsqueeze(2).to(q.dtype), MonotonicState(state.keys, state.values, state.padding, alignment)

    def peak_memory_estimate(self, batch, lq, lk, kv_heads, mode, dtype):
        itemsize = torch.empty((), dtype=compute_dtype(dtype)).element_size()
        per_step = 3 * batch * self.num_heads * lk * lk * itemsize  # transition matrix and its exponent
        steps = lq if mode in ("fwd", "fwdbwd", "bwd") else 1  # autograd keeps every step's transition
        return int(per_step * steps + 2 * batch * self.num_heads * lq * lk * itemsize)
