"""nystromformer: forward vs its naive reference, padding, batch independence, conformance, and a
cross-check against lucidrains' nystrom-attention."""

import importlib

import pytest
import torch

from cab import create_attention
from tests.attn_helpers import random_qkv

_inputs = random_qkv


@pytest.mark.parametrize("pattern,lq,lk", [("NS", 37, 37), ("NS", 6, 6), ("NC", 29, 45), ("NC", 5, 45)])
@pytest.mark.parametrize("padded", [True, False])
def test_forward_matches_reference_with_gradients(pattern, lq, lk, padded):
    attn = create_attention("nystromformer", pattern, 4, 8, num_landmarks=8)
    q, k, v = _inputs(2, 4, 2, lq, lk, 8)
    pad = torch.zeros(2, lk, dtype=torch.bool)
    if padded:
        pad[1, -4:] = True
        pad[1, 3] = True  # a hole in the middle too
    out, ref = attn(q, k, v, pad), attn.reference(q, k, v, pad)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    cot = torch.randn_like(out)
    g_out = torch.autograd.grad(out, (q, k, v), cot)
    g_ref = torch.autograd.grad(ref, (q, k, v), cot)
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)


def test_appended_padding_changes_nothing_and_padded_values_are_ignored():
    attn = create_attention("nystromformer", "NS", 2, 8)
    q, k, v = (t.detach() for t in _inputs(1, 2, 2, 40, 40, 8))
    alone = attn(q, k, v)
    extra = [torch.randn(1, 2, 9, 8, dtype=torch.float64) * 50 for _ in range(3)]
    qp, kp, vp = (torch.cat([t, e], dim=2) for t, e in zip((q, k, v), extra))
    pad = torch.zeros(1, 49, dtype=torch.bool)
    pad[:, 40:] = True
    torch.testing.assert_close(attn(qp, kp, vp, pad)[:, :, :40], alone, rtol=1e-10, atol=1e-11)


def test_batch_rows_are_independent():
    """The pseudo-inverse's starting scale is per matrix (lucidrains/CAB share one over the batch)."""
    attn = create_attention("nystromformer", "NS", 2, 8)
    q, k, v = (t.detach() for t in _inputs(3, 2, 2, 32, 32, 8))
    k[2] *= 5.0  # a batch row with a very different scale
    together = attn(q, k, v)
    for b in range(3):
        torch.testing.assert_close(together[b:b + 1], attn(q[b:b + 1], k[b:b + 1], v[b:b + 1]))


def test_matches_lucidrains_nystrom_attention():
    """nystrom-attention==0.0.14 (lucidrains) on the same q, k, v: identity projections, no residual conv,
    one head per call (its pseudo-inverse start is scaled by a maximum over all heads), a length that the
    landmarks divide (it left-pads the sequence with zeros otherwise)."""
    lucid = importlib.import_module("nystrom_attention")
    d, length, m = 8, 64, 16
    ref = lucid.NystromAttention(dim=3 * d, dim_head=d, heads=1, num_landmarks=m, pinv_iterations=6,
                                 residual=False).double()
    with torch.no_grad():
        ref.to_qkv.weight.copy_(torch.eye(3 * d))
        ref.to_out[0].weight.zero_()
        ref.to_out[0].weight[:d].copy_(torch.eye(d))
        ref.to_out[0].bias.zero_()
    attn = create_attention("nystromformer", "NS", 3, d, num_landmarks=m, pinv_iterations=6)
    q, k, v = (t.detach() for t in _inputs(2, 3, 3, length, length, d))
    with torch.no_grad():
        out = attn(q, k, v)
        theirs = torch.stack([
            torch.stack([ref(torch.cat([q[b, h], k[b, h], v[b, h]], dim=-1)[None])[0, :, :d] for h in range(3)])
            for b in range(2)
        ])
    torch.testing.assert_close(out, theirs, rtol=1e-10, atol=1e-12)
