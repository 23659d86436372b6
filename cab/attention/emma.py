"""Efficient Monotonic Multihead Attention (M63): the expected monotonic alignment of each target step over
a source read left to right, computed in closed form with a numerically stable transition matrix, plus
infinite-lookback soft attention up to the expected stopping point."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cab.attention.base import Attention, repeat_kv
from cab.attention.engine.prepare import compute_dtype, grouped_compute, real_keys, softmax_scale
from cab.registry import register_attention

_SELF = ("monotonic alignment aligns a target sequence to a separate source read left to right; on one "
         "sequence the alignment of a token to its own prefix is not the mechanism")

# target steps whose transition and lookback matrices (B * H * Lk * Lk elements a step) are built at once: large
# enough that the per-step Python loop is a matrix-vector product only, small enough to stay in cache-sized blocks
_BLOCK_ELEMENTS = 2 ** 20


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

    Numerics (large logits): every exponential takes a non-positive argument and every divisor is at least
    1 (or divides a zero), in float32 as in float64 (bfloat16 and float16 compute in float32). The
    exponent S_j - S_k = sum_{k<=l<j} log(1 - p_l) is summed along each row of T from its own k, not
    subtracted from one cumulative sum (whose rounding, |S| * eps, grows with the energies); each stop k's
    lookback softmax is shifted by its own running maximum m_k = max_{l<=k} u_l, so exp(u_j - m_k) <= 1
    and the shifted normaliser is >= 1. Shifting every prefix by the row maximum instead (as before issue
    16) underflowed the normaliser of a prefix whose keys all score ~88 or more below a later key: alpha_k
    / Z_k overflowed (NaN float32 outputs from max |q.k / sqrt(d)| ~ 144-200 depending on the inputs, NaN
    gradients from ~ 100) or, where Z_k reached 0, silently dropped alpha_k's mass. Measured (B=2, H=4,
    Lq=48, Lk=32, d=32, seeded, with and without padding): outputs and gradients finite in float32 and
    bfloat16 for max |q.k / sqrt(d)| from 50 up to 1e36 (the one bound left is that the scores themselves
    be finite in float32); float32 against float64 at the same inputs, relative error of the output 9e-7
    at 200 and 2e-6 at 1000, of the q and k gradients 3e-6 and 2e-5.

    Cost: O(Lk^2) a target step for the transition matrix and the lookback shares (autograd keeps both, two
    Lk x Lk matrices a step) — the closed form buys stability and parallelism over the source, not
    sub-quadratic time. Both depend on the scores only, so they are built for blocks of target steps at once
    and only the alignment's matrix-vector product with each step's transition loops over the Lq steps.
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

    @staticmethod
    def _triangles(lk: int, device) -> "tuple[torch.Tensor, torch.Tensor]":
        """(upper, below), (Lk, Lk) bool [row, col]: col >= row, and its complement col < row. Built once
        per forward, so the masks autograd keeps for every step are views of one tensor."""
        upper = torch.ones(lk, lk, dtype=torch.bool, device=device).triu()
        return upper, ~upper

    def _transitions(self, scores: torch.Tensor, real: torch.Tensor, last: torch.Tensor,
                     triangles: "tuple[torch.Tensor, torch.Tensor]") -> "tuple[torch.Tensor, torch.Tensor]":
        """(p (B, H, Q, Lk), transition (B, H, Q, Lk, Lk)) of Q target steps' scores (B, H, Q, Lk) at once: they
        depend on the scores only, so only the product with the previous alignment is left to the step loop.

        transition T[k, j] = exp(sum_{k <= l < j} log(1 - p_l)) for j >= k, else 0: each row's exponent is
        summed from its own k (the inclusive cumulative sum over l > k of log(1 - p_{l-1})), not taken as the
        difference S_j - S_k of one cumulative sum, whose rounding error |S| * eps grows with the energies and
        would leave T wrong by a relative |S| * eps where S_j and S_k are both large."""
        upper, below = triangles
        log_p, log_q = self._stop_logs(scores + self.energy_bias.to(scores.dtype)[None, :, None, None],
                                       real.unsqueeze(-2), last.unsqueeze(-2))
        shifted = F.pad(log_q[..., :-1], (1, 0)).unsqueeze(-2)
        transition = shifted.masked_fill(upper.mT, 0.0).cumsum(dim=-1)  # <= 0: log(1 - p) <= 0
        return torch.exp(log_p), transition.masked_fill_(below, float("-inf")).exp_()

    @staticmethod
    def _lookback(scores: torch.Tensor, alignments: torch.Tensor, real: torch.Tensor, values: torch.Tensor,
                  below: torch.Tensor) -> torch.Tensor:
        """Outputs (B, H, Q, Dv) of Q target steps from their scores and alignments (B, H, Q, Lk): MILk's
        infinite lookback, which needs no recursion once the alignments are known, so it runs for Q steps at once.

        beta_j = sum_{k >= j} alpha_k exp(u_j) / sum_{l <= k} exp(u_l). Each stop k's prefix softmax is shifted
        by its own running maximum m_k = max_{l <= k} u_l (a shift by the row maximum instead underflows a prefix
        whose keys all score far below a later key, and alpha_k / Z_k then overflows or loses alpha_k):
        share[j, k] = exp(u_j - m_k) <= 1 for j <= k, and the shifted normaliser z_k = sum_{j <= k} share[j, k]
        >= 1 wherever a real key is in the prefix (else 0, and then alpha_k = 0 too: no key up to k can be
        stopped at). m is a shift only, held constant."""
        u = scores.masked_fill(~real.unsqueeze(-2), float("-inf"))
        running = u.detach().cummax(dim=-1).values
        running = torch.where(torch.isfinite(running), running, torch.zeros_like(running))
        share = (u.unsqueeze(-1) - running.unsqueeze(-2)).masked_fill_(below, float("-inf")).exp_()
        z = share.sum(dim=-2)
        ratio = alignments / torch.where(z > 0, z, torch.ones_like(z))
        beta = (share @ ratio.unsqueeze(-1)).squeeze(-1)
        return beta @ values

    def _steps(self, alignment: torch.Tensor, scores: torch.Tensor, real: torch.Tensor, last: torch.Tensor,
               values: torch.Tensor, triangles: "tuple[torch.Tensor, torch.Tensor] | None" = None
               ) -> "tuple[torch.Tensor, torch.Tensor]":
        """(outputs (B, H, Q, Dv), last alignment (B, H, Lk)) of Q consecutive target steps (scores (B, H, Q, Lk))
        from the alignment before them (`triangles`: `_triangles(Lk)`, built here when not given). Only the
        alignment recursion alpha_i = p_i * (alpha_{i-1} T_i) runs step by step.

        Every exponential takes a non-positive argument and every divisor is either at least 1 or stands
        under a zero numerator, so no intermediate overflows at any logit size (see the class docstring)."""
        triangles = self._triangles(scores.shape[-1], scores.device) if triangles is None else triangles
        stop, transition = self._transitions(scores, real, last, triangles)
        alignments = []
        for i in range(scores.shape[-2]):
            alignment = stop[:, :, i] * (alignment.unsqueeze(-2) @ transition[:, :, i]).squeeze(-2)
            alignments.append(alignment)
        return self._lookback(scores, torch.stack(alignments, dim=2), real, values, triangles[1]), alignment

    def _step(self, alignment: torch.Tensor, scores: torch.Tensor, real: torch.Tensor, last: torch.Tensor,
              values: torch.Tensor, triangles: "tuple[torch.Tensor, torch.Tensor] | None" = None
              ) -> "tuple[torch.Tensor, torch.Tensor]":
        """(output (B, H, Dv), alignment (B, H, Lk)) of one target step (scores (B, H, Lk)) from the previous
        alignment: `_steps` with Q = 1."""
        out, alignment = self._steps(alignment, scores.unsqueeze(-2), real, last, values, triangles)
        return out.squeeze(-2), alignment

    @staticmethod
    def _real_and_last(
        padding: "torch.Tensor | None", batch: int, lk: int, device
    ) -> "tuple[torch.Tensor, torch.Tensor]":
        real = real_keys(padding, batch, lk, device)
        index = torch.arange(lk, device=device).expand(batch, lk)
        last_index = torch.where(real, index, torch.full_like(index, -1)).amax(dim=-1, keepdim=True)
        return real[:, None, :], (index == last_index)[:, None, :]

    @staticmethod
    def _initial(batch: int, heads: int, lk: int, like: torch.Tensor) -> torch.Tensor:
        start = like.new_zeros(batch, heads, lk)
        start[..., 0] = 1.0
        return start

    def forward(self, q, k, v, key_padding_mask=None):
        q, k, v, out_dtype = grouped_compute(q, k, v)
        b, h, lq, _ = q.shape
        lk = k.shape[-2]
        if lk == 0:
            return q.new_zeros(b, h, lq, v.shape[-1]).to(out_dtype)
        real, last = self._real_and_last(key_padding_mask, b, lk, q.device)
        scores = self._energies(q, k)
        alignment, rows, triangles = self._initial(b, h, lk, q), [], self._triangles(lk, q.device)
        block = max(1, _BLOCK_ELEMENTS // (b * h * lk * lk))
        for start in range(0, lq, block):
            out, alignment = self._steps(alignment, scores[:, :, start:start + block], real, last, v, triangles)
            rows.append(out)
        return torch.cat(rows, dim=2).to(out_dtype)

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
            alpha, carry, p_prev = [], None, None
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
        initial = self._initial(b, self.num_heads, lk, k.to(compute_dtype(k.dtype)))
        return MonotonicState(k, v, key_padding_mask, initial)

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
        # autograd keeps two Lk x Lk matrices a step (transition, lookback shares; measured 2.04 on CPU at
        # Lq=64, Lk=512), a step without autograd peaks at ~2.4 (its exponents are exponentiated in place)
        per_step = 3 * batch * self.num_heads * lk * lk * itemsize
        steps = lq if mode in ("fwd", "fwdbwd", "bwd") else 1
        return int(per_step * steps + 2 * batch * self.num_heads * lq * lk * itemsize)
