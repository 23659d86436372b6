"""nalaformer (M13): forward vs reference (outputs and gradients), the feature maps by hand, norm-aware
sharpness and sign inhibition, decoding, conformance."""

import pytest
import torch

from cab import create_attention
from tests.attn_helpers import SHAPES, assert_reference_agrees, random_qkv


@pytest.mark.parametrize("pattern,lq,lk", SHAPES)
def test_forward_matches_reference_with_gradients(pattern, lq, lk):
    attn = create_attention("nalaformer", pattern, 4, 8)
    assert_reference_agrees(attn, lq, lk)


def test_feature_maps_by_hand():
    attn = create_attention("nalaformer", "NS", 1, 3)
    q = torch.tensor([[[[3.0, -4.0, 0.0]]]], dtype=torch.float64)  # |q| = 5
    p = 3 * (0.5 + torch.tanh(torch.tensor(5.0, dtype=torch.float64)))
    phi_q, phi_k = attn.features(q, q)
    torch.testing.assert_close(phi_q[0, 0, 0], torch.stack([0.6 ** p, 0 * p, 0 * p, 0 * p, 0.8 ** p, 0 * p]))
    torch.testing.assert_close(phi_k[0, 0, 0], torch.tensor([27.0, 0, 0, 0, 64.0, 0], dtype=torch.float64))


def test_opposite_signs_do_not_interact_and_larger_query_norm_sharpens():
    attn = create_attention("nalaformer", "NS", 1, 2)
    q = torch.tensor([[[[1.0, 0.0]]]], dtype=torch.float64)
    k = torch.tensor([[[[-1.0, 0.0], [0.0, 1.0]]]], dtype=torch.float64)
    phi_q, phi_k = attn.features(q, k)
    assert float((phi_q @ phi_k.transpose(-1, -2)).abs().max()) == 0.0  # no shared-sign dimension: weight 0
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 8, 16, generator=gen, dtype=torch.float64)
    k = torch.randn(1, 1, 64, 16, generator=gen, dtype=torch.float64)

    def entropy(query):
        phi_q, phi_k = attn.features(query, k)
        w = phi_q @ phi_k.transpose(-1, -2)
        w = w / w.sum(-1, keepdim=True)
        return float(-(w * torch.log(w.clamp_min(1e-300))).sum(-1).mean())

    small, large = entropy(q / q.norm(dim=-1, keepdim=True) * 0.1), entropy(q / q.norm(dim=-1, keepdim=True) * 3)
    assert large < small - 0.3, (small, large)


def test_zero_query_has_finite_gradients():
    attn = create_attention("nalaformer", "CS", 2, 4)
    q, k, v = random_qkv(1, 2, 2, 6, 9, 4)  # Lq < Lk: zero rows are prepended for the alignment
    with torch.no_grad():
        q[:, :, 2] = 0.0
    out = attn(q, k, v)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(bool(torch.isfinite(g).all()) for g in grads)
