"""inline: forward vs its dense reference (outputs and gradients), the official layer's closed form,
rows summing to one, injectivity (scaled queries are told apart), the local term's taps, decoding,
conformance."""

import pytest
import torch

from cab import create_attention
from tests.attn_helpers import assert_decode_matches_forward, assert_reference_agrees, holey_padding, random_qkv


@pytest.mark.parametrize("pattern,lq,lk", [
    ("NS", 37, 37), ("NS", 9, 13), ("CS", 70, 70), ("CS", 5, 12), ("CS", 12, 5), ("NC", 23, 41), ("CC", 41, 23),
])
def test_forward_matches_reference_with_gradients(pattern, lq, lk):
    attn = create_attention("inline", pattern, 4, 8, seed=1)
    assert_reference_agrees(attn, lq, lk)


def test_matches_the_official_closed_form():
    """The DeiT layer's expression: x = q (k^T v s / n) + (1 - s q mean(k)) mean(v), s = d^-1/2."""
    q, k, v = (t.detach() for t in random_qkv(2, 3, 3, 25, 25, 8))
    s, n = 8 ** -0.5, 25
    expected = q @ (k.transpose(-1, -2) @ v * s / n) + (1 - q @ k.mean(dim=2, keepdim=True).transpose(-1, -2) * s) \
        * v.mean(dim=2, keepdim=True)
    out = create_attention("inline", "NS", 3, 8, local_kernel=0)(q, k, v)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("pattern", ["NS", "CS"])
def test_rows_sum_to_one_and_scaled_queries_differ(pattern):
    """With v = 1 every row outputs 1 (weights sum to one, also causally and with padding); a ReLU-kernel
    normalised linear attention gives q and 2q the same weights, InLine does not (injectivity)."""
    attn = create_attention("inline", pattern, 2, 8, local_kernel=0)
    q, k, _ = (t.detach() for t in random_qkv(2, 2, 2, 30, 30, 8))
    ones = torch.ones(2, 2, 30, 8, dtype=torch.float64)
    pad = holey_padding(30)
    out = attn(q, k, ones, pad)
    torch.testing.assert_close(out, torch.ones_like(out))
    v = torch.randn(2, 2, 30, 8, dtype=torch.float64)
    assert (attn(q, k, v, pad) - attn(2 * q, k, v, pad)).abs().amax() > 1e-3


def test_local_term_uses_the_declared_taps():
    """The local term alone (the difference of two modules that differ only by it) depends on v_{i-1..i+1}
    in NS and on v_{i-2..i} in CS."""
    for pattern, lo, hi in (("NS", -1, 1), ("CS", -2, 0)):
        with_local = create_attention("inline", pattern, 1, 4, seed=2)
        without = create_attention("inline", pattern, 1, 4, local_kernel=0)
        q, k, v = random_qkv(1, 1, 1, 12, 12, 4)
        diff = with_local(q, k, v) - without(q, k, v)
        (grad,) = torch.autograd.grad(diff[0, 0, 6].sum(), v)
        used = (grad[0, 0].abs().sum(-1) > 0).nonzero().flatten().tolist()
        assert used == list(range(6 + lo, 6 + hi + 1)), (pattern, used)


def test_decode_matches_forward():
    attn = create_attention("inline", "CS", 4, 8, seed=3)
    for start, end in assert_decode_matches_forward(attn, prefills=(0, 1, 9)):
        assert end == start  # constant in the length
