"""gaussian_adaptive_attention (M58): blocked forward vs the per-row reference (outputs and gradients incl. the
learned offset and scale, every pattern, odd and unequal lengths, holey padding, GQA); the weights on a
tiny example computed by hand with `math`; the uniform limit of a huge variance scale; conformance."""

import math

import pytest
import torch

from cab import create_attention
from tests.attn_helpers import assert_reference_agrees, holey_padding, random_qkv

NAME = "gaussian_adaptive_attention"
SHAPES = [("NS", 21, 21), ("CS", 21, 21), ("CS", 7, 19), ("CS", 19, 7), ("NC", 9, 19), ("CC", 19, 9)]


@pytest.mark.parametrize("pattern,lq,lk", SHAPES)
def test_forward_matches_reference(pattern, lq, lk):
    attn = create_attention(NAME, pattern, 4, 8, chunk_size=8, mean_offset=0.5, variance_scale=0.7).double()
    assert_reference_agrees(attn, lq, lk, params=(attn.mean_offset, attn.log_variance_scale))


def test_weights_by_hand():
    """One query, three keys, d = 2: scores (2, -1, 0.5)/sqrt(2); mean, population variance, Gaussian."""
    s = [2 / math.sqrt(2), -1 / math.sqrt(2), 0.5 / math.sqrt(2)]
    mean = sum(s) / 3
    var = sum((x - mean) ** 2 for x in s) / 3
    delta, xi, eps = 0.4, 0.5, 1e-5
    dens = [math.exp(-((x - mean - delta) ** 2) / (2 * (xi * var + eps))) for x in s]
    w = [x / sum(dens) for x in dens]
    values = [[1.0, 2.0], [3.0, -1.0], [-2.0, 0.5]]
    attn = create_attention(NAME, "NS", 1, 2, mean_offset=delta, variance_scale=xi).double()
    t = lambda rows: torch.tensor(rows, dtype=torch.float64)[None, None]  # noqa: E731
    out = attn(t([[1.0, 0.0]]), t([[2.0, 0.0], [-1.0, 3.0], [0.5, -1.0]]), t(values))[0, 0, 0]
    expected = torch.tensor([sum(wi * v[c] for wi, v in zip(w, values)) for c in range(2)], dtype=torch.float64)
    torch.testing.assert_close(out, expected)


def test_huge_variance_scale_gives_the_mean_of_the_visible_values():
    q, k, v = (t.detach() for t in random_qkv(2, 2, 2, 9, 9, 8))
    pad = holey_padding(9)
    out = create_attention(NAME, "CS", 2, 8, variance_scale=1e12).double()(q, k, v, pad)
    visible = torch.ones(9, 9, dtype=torch.bool).tril()[None, None] & ~pad[:, None, None, :]
    expected = (visible.double() @ v) / visible.sum(-1, keepdim=True)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-8)


def test_two_parameters_per_head():
    assert sum(p.numel() for p in create_attention(NAME, "NS", 4, 8).parameters()) == 8
