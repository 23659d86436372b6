"""linfusion (LinFusion generalized normalized linear attention, M24): forward vs reference in every pattern
(outputs and gradients, parameters included), the released code's formula, the length-invariance that the
normalisation buys, decoding, parameters and seeds, conformance."""

import pytest
import torch
import torch.nn.functional as F

from cab import create_attention
from tests.attn_helpers import SHAPES_CHUNKED, assert_reference_agrees, random_qkv


@pytest.mark.parametrize("pattern,lq,lk", SHAPES_CHUNKED)
def test_forward_matches_reference_with_gradients(pattern, lq, lk):
    attn = create_attention("linfusion", pattern, 4, 8, chunk_size=5, seed=1).double()
    assert_reference_agrees(attn, lq, lk, params=attn.parameters())


def test_noncausal_equals_the_released_code_formula():
    """linfusion/attention.py: z = phi(q) mean(phi(k)) + 1e-4; kv = (phi(k)^T L^-1/2)(v L^-1/2); out = phi(q) kv / z,
    with phi(x) = elu(x + f(x)) + 1."""
    attn = create_attention("linfusion", "NS", 2, 8, seed=3).double()
    q, k, v = (t.detach() for t in random_qkv(1, 2, 2, 33, 33, 8, seed=2))
    query, key = F.elu(attn.to_q_(q)) + 1.0, F.elu(attn.to_k_(k)) + 1.0
    z = query @ key.mean(dim=-2, keepdim=True).transpose(-2, -1) + 1e-4
    kv = (key.transpose(-2, -1) * 33 ** -0.5) @ (v * 33 ** -0.5)
    torch.testing.assert_close(attn(q, k, v), query @ kv / z, rtol=1e-12, atol=1e-12)


def test_normalisation_makes_outputs_invariant_to_repeating_the_keys():
    """Mean-normalised sums: duplicating every key and value leaves the output unchanged (up to eps's
    n-scaling, which is also a mean), the point of LinFusion's normalisation for resolution changes."""
    attn = create_attention("linfusion", "NC", 2, 8).double()
    q, k, v = (t.detach() for t in random_qkv(1, 2, 2, 7, 11, 8, seed=5))
    torch.testing.assert_close(attn(q, k, v), attn(q, k.repeat(1, 1, 3, 1), v.repeat(1, 1, 3, 1)), rtol=1e-12,
                               atol=1e-12)


def test_parameters_are_seeded_and_trainable():
    a, b, c = (create_attention("linfusion", "NS", 2, 8, seed=s) for s in (0, 0, 1))
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.to_q_.w1, c.to_q_.w1)
    assert sum(p.numel() for p in a.parameters()) == 2 * (8 * 8 + 8 + 8 + 8 + 8 * 8 + 8)
