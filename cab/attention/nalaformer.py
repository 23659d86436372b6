"""NaLaFormer: norm-aware linear attention — a query-norm-dependent power kernel on the query's direction and
a sign-split (norm-preserving, non-negative) mapping that keeps opposite-sign dimensions from interacting."""

from __future__ import annotations

import torch

from cab.attention.engine.feature_map import FeatureMapAttention
from cab.registry import register_attention

NORM_FLOOR = 1e-12  # a zero query (e.g. an alignment row) has no direction: its features are 0


@register_attention(
    "nalaformer", patterns=("NS", "CS", "NC", "CC"), family="linear", exact=False, mechanism="M13",
    citation="Meng, Luo, Huo, Wang, Li & Zhang, NaLaFormer: Norm-Aware Linear Attention for Transformer Models, "
    "arXiv 2025 (2506.21137)",
)
class NaLaFormerAttention(FeatureMapAttention):
    """Norm-aware linear attention (NaLa), normalised linear attention with the feature maps

        phi_q(q) = [ (relu(q) / |q|)^p(q), (relu(-q) / |q|)^p(q) ],  p(q) = power * (0.5 + tanh(|q|)),
        phi_k(k) = [ relu(k)^key_power, relu(-k)^key_power ]           (2d features each).

    The query is split into norm and direction: the direction enters the kernel, the norm sets the power
    (a larger query norm gives a sharper, lower-entropy distribution, as softmax does); the sign split
    keeps every feature non-negative without zeroing valid interactions: dimension d contributes only when
    q_d and k_d share a sign ("inhibit dimensions with opposite directions").

    [BG] The abstract leaves the kernel open; this follows the authors' released NormAwareLinearAttn module
    (k <- k^3; q split into relu(+/-q) / |q| raised to 3 (0.5 + tanh |q|); output phi_q (phi_k^T V) times
    1 / (phi_q . mean phi_k)), with `power` = `key_power` = 3 as there. Omitted as not part of the operator:
    the rotary position terms the released code adds to the numerator only, its depthwise-conv LePE, output
    gate, LayerNorm and projections; its 1e-6 added to the normaliser (a row with all-zero weights outputs
    0 here). A zero query has no direction and gets zero features (|q| floored at 1e-12).

    Patterns: NS/NC/CC with the global key summary (no row reads another query), CS with the tiled causal
    product (bottom-right aligned when Lq != Lk). Padded keys have zero features. Decoding keeps
    (phi_k^T V, phi_k^T 1).
    """

    repr_fields = ("power", "key_power")

    def __init__(self, pattern, num_heads, head_dim, power: float = 3.0, key_power: float = 3.0):
        super().__init__(pattern, num_heads, head_dim)
        if power <= 0 or key_power <= 0:
            raise ValueError(f"power and key_power must be positive, got {power} and {key_power}")
        self.power, self.key_power = power, key_power

    def features(self, q, k):
        phi_q = phi_k = None
        if q is not None:
            norm = torch.linalg.vector_norm(q, dim=-1, keepdim=True).clamp_min(NORM_FLOOR)
            exponent = self.power * (0.5 + torch.tanh(norm))
            phi_q = torch.cat([torch.relu(q) / norm, torch.relu(-q) / norm], dim=-1) ** exponent
        if k is not None:
            phi_k = torch.cat([torch.relu(k), torch.relu(-k)], dim=-1) ** self.key_power
        return phi_q, phi_k

    def feature_dim(self) -> int:
        return 2 * self.head_dim
