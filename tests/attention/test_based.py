"""based: forward vs its dense reference (outputs and gradients), the Taylor feature-map identity, the
window reach, decoding with an honest state size (Taylor state + window ring buffer), conformance."""

import pytest
import torch

from cab import create_attention
from cab.attention.based import taylor_features
from tests.attn_helpers import assert_decode_matches_forward, assert_reference_agrees, random_qkv


@pytest.mark.parametrize("pattern,lq,lk,window", [
    ("NS", 37, 37, 8), ("CS", 70, 70, 8), ("CS", 70, 70, 64), ("CS", 5, 12, 4), ("CS", 12, 5, 4),
])
def test_forward_matches_reference_with_gradients(pattern, lq, lk, window):
    attn = create_attention("based", pattern, 4, 8, feature_dim=4, window=window, seed=1)
    assert_reference_agrees(attn, lq, lk)


def test_taylor_feature_map_identity():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 5, 16, generator=gen, dtype=torch.float64)
    s = (x * y).sum(-1) / 4.0
    assert taylor_features(x).shape[-1] == 1 + 16 + 256
    torch.testing.assert_close((taylor_features(x) * taylor_features(y)).sum(-1), 1 + s + s * s / 2)


def test_window_reach_in_causal_self():
    """Row 15 with window 4 depends on every key up to 15 (the Taylor branch) and none after; the window
    branch alone (2 x output minus the Taylor branch) depends on keys 12..15 only."""
    q, k, v = random_qkv(1, 1, 1, 20, 20, 8)
    narrow = create_attention("based", "CS", 1, 8, feature_dim=4, window=4)
    (grad,) = torch.autograd.grad(narrow(q, k, v)[0, 0, 15].sum(), v)
    assert (grad[0, 0, :16].abs().sum(-1) > 0).all() and not grad[0, 0, 16:].any()
    taylor = narrow._taylor(q, k, v, None)
    (grad,) = torch.autograd.grad((narrow(q, k, v) * 2 - taylor)[0, 0, 15].sum(), v)
    used = (grad[0, 0].abs().sum(-1) > 0).nonzero().flatten().tolist()
    assert used == [12, 13, 14, 15]


def test_decode_matches_forward_and_state_is_taylor_plus_window():
    window, f, d = 6, 4, 8
    attn = create_attention("based", "CS", 4, d, feature_dim=f, window=window, seed=2)
    features = 1 + f + f * f
    taylor = 8 * 2 * 4 * features * (d + 1)
    ring = 8 * 2 * 2 * window * d * 2 + 2 * window  # keys and values at the 2 kv heads, bool flags
    for _, end in assert_decode_matches_forward(attn, prefills=(0, 3, 11)):
        assert end == taylor + ring
