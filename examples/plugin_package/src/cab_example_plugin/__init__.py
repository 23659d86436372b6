"""Linear attention with the elu+1 feature map (Katharopoulos et al., Transformers are RNNs, ICML 2020).

out_i = phi(q_i) S_i / (phi(q_i) z_i) with S = sum_j phi(k_j) v_j^T and z = sum_j phi(k_j) over the keys that
row i may see: all keys (NS, NC, CC: each query row is computed on its own, so query-side causality holds)
or keys j <= i through prefix sums (CS). Padded keys are removed by zeroing their features.

Decoding is recurrent: the state is (S, z) per key/value head, O(D^2) whatever the context length; CS adds
each new token's phi(k) v^T and phi(k), CC keeps the memory's sums fixed.
"""

import torch
import torch.nn.functional as F

import cab
from cab.attention.base import repeat_kv


def _features(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1.0


@cab.register_attention(
    "example_linear", patterns=("NS", "CS", "NC", "CC"), family="linear", exact=False,
    citation="Katharopoulos et al., Transformers are RNNs: Fast Autoregressive Transformers with Linear "
    "Attention, ICML 2020",
)
class ExampleLinearAttention(cab.Attention):
    """elu+1 linear attention: O(L D^2) time, O(D^2) state per head."""

    complexity = {"time": 1, "memory": 1}

    def __init__(self, pattern, num_heads, head_dim, eps: float = 1e-6):
        super().__init__(pattern, num_heads, head_dim)
        self.eps = eps

    def _inputs(self, q, k, v, key_padding_mask):
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        phi_q, phi_k = _features(q), _features(k)
        if key_padding_mask is not None:
            keep = (~key_padding_mask.bool())[:, None, :, None].to(phi_k.dtype)
            phi_k = phi_k * keep
        return phi_q, phi_k, v

    def forward(self, q, k, v, key_padding_mask=None):
        phi_q, phi_k, v = self._inputs(q, k, v, key_padding_mask)
        if self.causal and not self.cross:
            # prefix sums of k v^T and k; fine for the example's small head dims
            state = torch.cumsum(phi_k.unsqueeze(-1) * v.unsqueeze(-2), dim=2)  # (B, H, L, D, Dv)
            norm = torch.cumsum(phi_k, dim=2)
            num = torch.einsum("bhld,bhlde->bhle", phi_q, state)
            den = torch.einsum("bhld,bhld->bhl", phi_q, norm).unsqueeze(-1)
        else:
            state = torch.einsum("bhld,bhle->bhde", phi_k, v)
            num = torch.einsum("bhld,bhde->bhle", phi_q, state)
            den = (phi_q @ phi_k.sum(dim=2).unsqueeze(-1))
        return num / (den + self.eps)

    def reference(self, q, k, v, key_padding_mask=None):
        """The quadratic form: similarity matrix phi(Q) phi(K)^T, masked, row-normalised."""
        phi_q, phi_k, v = self._inputs(q, k, v, key_padding_mask)
        sim = phi_q @ phi_k.transpose(-1, -2)
        if self.causal and not self.cross:
            lq, lk = sim.shape[-2:]
            sim = sim * cab.patterns.visibility_mask("CS", lq, lk, device=sim.device).to(sim.dtype)
        return (sim @ v) / (sim.sum(dim=-1, keepdim=True) + self.eps)

    def algorithmic_flops(self, batch, lq, lk, kv_heads):
        """The matmuls of forward: CS, per position, phi(q) S_i and phi(q) z_i; otherwise phi(K)^T V once,
        then phi(Q) S and phi(Q) z."""
        per_head = 2 * lq * self.head_dim * (self.head_dim + 1)
        if not (self.causal and not self.cross):
            per_head += 2 * lk * self.head_dim * self.head_dim
        return batch * self.num_heads * per_head

    def decode_init(self, k, v, key_padding_mask=None, capacity=None):
        """(S, z): sums of phi(k) v^T (B, Hkv, D, Dv) and phi(k) (B, Hkv, D) over the real keys given."""
        if not self.causal:
            raise ValueError(f"incremental decoding applies to the causal patterns CS and CC, not {self.pattern.value}")
        phi_k = _features(k)
        if key_padding_mask is not None:
            phi_k = phi_k * (~key_padding_mask.bool())[:, None, :, None].to(phi_k.dtype)
        return torch.einsum("bhld,bhle->bhde", phi_k, v), phi_k.sum(dim=2)

    def decode_step(self, state, q, k=None, v=None):
        summed, norm = state
        if not self.cross:
            phi_k = _features(k[:, :, 0])
            summed = summed + phi_k.unsqueeze(-1) * v[:, :, 0].unsqueeze(-2)
            norm = norm + phi_k
        b, hq, _, d = q.shape
        phi_q = _features(q[:, :, 0]).reshape(b, summed.shape[1], hq // summed.shape[1], d)  # query heads per kv head
        num = torch.einsum("bhgd,bhde->bhge", phi_q, summed)
        den = torch.einsum("bhgd,bhd->bhg", phi_q, norm).unsqueeze(-1)
        return (num / (den + self.eps)).reshape(b, hq, 1, summed.shape[-1]), (summed, norm)
