"""ABC: attention with bounded-memory control — keys and values are written into r memory slots by
softmax-normalised control weights, and each query attends over the slots; causal via cumulative forms."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cab.attention.base import Attention, repeat_kv
from cab.attention.engine.feature_map import shifted_exp
from cab.attention.engine.prepare import align_bottom_right, compute_dtype, nonzero, softmax_scale
from cab.patterns import Pattern
from cab.registry import register_attention

CHUNK = 64  # rows per chunk of the causal path


def _slots(x: torch.Tensor, control: torch.Tensor, key_padding_mask) -> torch.Tensor:
    """(B, H, r, D) memory of x (B, H, L, D): slot s holds sum_j softmax_j(x_j^T W[:, s]) x_j over the real
    positions j (W = `control`, (D, r)); a batch row without a real position gives zeros.

    The control logits are laid out (B, H, r, L), so that the softmax runs along contiguous memory and the
    write is a plain (r x L)(L x D) product (CAB's layout). The (L, r) layout, with its max-shift, exp and sum
    reduced along the strided L axis and a product with its transpose, made the NS forward 1.2x slower than
    CAB's at B=1, H=8, L=4096, D=64, r=16 on one CPU thread (benchmarks/vs_cab.py)."""
    logits = (x @ control.to(x.dtype)).transpose(-1, -2).contiguous()  # (B, H, r, L)
    if key_padding_mask is None:
        return torch.softmax(logits, dim=-1) @ x
    pad = key_padding_mask.bool()[:, None, None, :]
    empty = pad.all(dim=-1, keepdim=True)  # (B, 1, 1, 1): no real key at all
    logits = logits.masked_fill(pad, float("-inf")).masked_fill(empty, 0.0)
    return torch.softmax(logits, dim=-1).masked_fill(empty, 0.0) @ x


@register_attention(
    "abc", patterns=("NS", "CS", "NC", "CC"), family="low-rank", exact=False, version=2,
    citation="Peng et al., ABC: Attention with Bounded-memory Control, ACL 2022",
)
class ABCAttention(Attention):
    """ABC (paper Sec. 2-3): memory K~ = phi_K^T K, V~ = phi_V^T V with r = `num_slots` slots (CAB's default
    16), the control weights softmax-normalised over positions, phi_K[:, s] = softmax_j(k_j^T W_K[:, s]),
    phi_V[:, s] = softmax_j(v_j^T W_V[:, s]); output softmax(q K~^T / sqrt(d)) V~. As in CAB's ABC the
    controls are learned (d, r) projections of the keys and of the values (shared by all heads, Xavier-
    uniform with gain 2^-1/2, so deterministic under torch.manual_seed), not of the layer input.

    Causal self (CS): row t uses the memory of the prefix, K~_t = sum_{j<=t} softmax_{j<=t}(alpha_j) k_j
    (the cumulative form; CAB's causal code used only the current token's term instead of the prefix sum).
    Computed in chunks without materialising the (L, r, d) memories: within a chunk the (C x C) causal
    block of q k^T is explicit, across chunks the r x d slot sums are exclusive cumulative sums, and the
    normalisers are cumulative sums of the control weights. The weights are exp-shifted by one detached
    constant per slot (the maximum over real positions), which cancels exactly; as it spans later
    positions too, it could reach a row's value only through floating-point underflow of earlier
    weights (its gradient is zero). CS is bottom-right
    aligned when Lq != Lk. NS/NC/CC compress all keys once; CC is query-causal as every row is computed
    from the key memory alone. Padded keys get zero control weight (they enter no slot and no
    normaliser); a row with no visible key outputs 0.
    """

    def __init__(self, pattern, num_heads, head_dim, num_slots: int = 16):
        super().__init__(pattern, num_heads, head_dim)
        if num_slots < 1:
            raise ValueError(f"num_slots must be positive, got {num_slots}")
        self.num_slots = num_slots
        self.control_k = nn.Parameter(torch.empty(head_dim, num_slots))
        self.control_v = nn.Parameter(torch.empty(head_dim, num_slots))
        nn.init.xavier_uniform_(self.control_k, gain=2**-0.5)
        nn.init.xavier_uniform_(self.control_v, gain=2**-0.5)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_slots={self.num_slots}"

    def _memory(self, k: torch.Tensor, v: torch.Tensor, key_padding_mask) -> "tuple[torch.Tensor, torch.Tensor]":
        """Noncausal (K~, V~), each (B, H, r, D), from all real keys."""
        return _slots(k, self.control_k, key_padding_mask), _slots(v, self.control_v, key_padding_mask)

    def _causal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask) -> torch.Tensor:
        """Chunked causal ABC for Lq == Lk (see the class docstring)."""
        batch, heads, length, dim = q.shape
        c = CHUNK
        ek = shifted_exp(k @ self.control_k.to(k.dtype), key_padding_mask)  # (B, H, L, r)
        ev = shifted_exp(v @ self.control_v.to(v.dtype), key_padding_mask)
        zk, zv = nonzero(ek.cumsum(dim=-2)), nonzero(ev.cumsum(dim=-2))  # normalisers of the prefix
        pad = (-length) % c
        n = (length + pad) // c

        def chunks(x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
            return F.pad(x, (0, 0, 0, pad), value=fill).reshape(batch, heads, n, c, x.shape[-1])

        qc, kc, vc, ekc, evc = map(chunks, (q, k, v, ek, ev))
        zkc, zvc = chunks(zk, 1.0), chunks(zv, 1.0)  # rows past the end: any non-zero normaliser

        def exclusive_prefix(states: torch.Tensor) -> torch.Tensor:  # (B, H, N, r, D) summed over earlier chunks
            return F.pad(states.cumsum(dim=2)[:, :, :-1], (0, 0, 0, 0, 1, 0))

        k_prev = exclusive_prefix(ekc.transpose(-1, -2) @ kc)  # sum of e_k k over earlier chunks: (B, H, N, r, D)
        v_prev = exclusive_prefix(evc.transpose(-1, -2) @ vc)
        tril = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
        qk = (qc @ kc.transpose(-1, -2)).masked_fill(~tril, 0.0)  # (B, H, N, C, C)
        scores = (qc @ k_prev.transpose(-1, -2) + qk @ ekc) / zkc * softmax_scale(dim)  # q_t . K~_t
        probs = torch.softmax(scores, dim=-1) / zvc  # (B, H, N, C, r), divided by V~'s normaliser
        mix = (probs @ evc.transpose(-1, -2)).masked_fill(~tril, 0.0)  # (B, H, N, C, C)
        out = probs @ v_prev + mix @ vc
        return out.reshape(batch, heads, n * c, -1)[:, :, :length]

    def forward(self, q, k, v, key_padding_mask=None):
        out_dtype = q.dtype
        dtype = compute_dtype(q.dtype)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        if self.pattern is Pattern.CS:
            k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
            q, k, v, key_padding_mask, drop = align_bottom_right(q, k, v, key_padding_mask)
            return self._causal(q, k, v, key_padding_mask)[:, :, drop:].to(out_dtype)
        keys, values = self._memory(k, v, key_padding_mask)
        keys = keys * softmax_scale(q.shape[-1])  # the score scale on the r x D memory, not the L x r scores
        keys, values = repeat_kv(keys, q.shape[1]), repeat_kv(values, q.shape[1])
        probs = torch.softmax(q @ keys.transpose(-1, -2), dim=-1)
        return (probs @ values).to(out_dtype)

    def reference(self, q, k, v, key_padding_mask=None):
        """Per batch element and per prefix: the memory of the keys a row may see (all of them, or in CS
        the row's prefix) written with explicit softmaxes over those positions, then softmax attention of
        the rows over the r slots."""
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        lq, lk = q.shape[-2], k.shape[-2]
        if self.pattern is Pattern.CS:
            groups = [(t + lk - lq, [t]) for t in range(lq)]  # (last visible key, rows)
        else:
            groups = [(lk - 1, list(range(lq)))]
        out = q.new_zeros(q.shape[0], q.shape[1], lq, v.shape[-1])
        for b in range(q.shape[0]):
            real = torch.ones(lk, dtype=torch.bool, device=q.device)
            if key_padding_mask is not None:
                real = ~key_padding_mask[b].bool()
            for last, rows in groups:
                seen = real & (torch.arange(lk, device=q.device) <= last)
                if not bool(seen.any()):
                    continue
                kb, vb = k[b][:, seen], v[b][:, seen]  # (H, M, D)
                keys = torch.softmax(kb @ self.control_k.to(kb.dtype), dim=-2).transpose(-1, -2) @ kb  # (H, r, D)
                values = torch.softmax(vb @ self.control_v.to(vb.dtype), dim=-2).transpose(-1, -2) @ vb
                weights = torch.softmax(q[b][:, rows] @ keys.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
                out[b][:, rows] = weights @ values
        return out
