"""l2vit: forward vs its dense reference (outputs and gradients), the authors' linear-attention expression,
the window reach, the refused patterns, conformance."""

import pytest
import torch

from cab import create_attention
from tests.attn_helpers import assert_reference_agrees, random_qkv


@pytest.mark.parametrize("lq,lk,window,floor", [(37, 37, 7, 100.0), (37, 37, 5, 1.0), (9, 14, 4, 1.0), (14, 9, 4, 1.0)])
def test_forward_matches_reference_with_gradients(lq, lk, window, floor):
    attn = create_attention("l2vit", "NS", 4, 8, window=window, lcm_kernel=3, denominator_floor=floor, seed=1)
    assert_reference_agrees(attn, lq, lk)


def test_linear_branch_is_the_authors_expression():
    """LinearAttention.forward of the official code: q, k = relu; denom = clamp(q (k^T 1), 1e2);
    attn = (k^T v) * temperature; x = q attn / denom."""
    attn = create_attention("l2vit", "NS", 3, 8)
    q, k, v = (t.detach() for t in random_qkv(2, 3, 3, 30, 30, 8))
    qr, kr = torch.relu(q), torch.relu(k)
    denom = torch.clamp(qr @ kr.transpose(-2, -1).sum(dim=-1, keepdim=True), 1e2)
    expected = qr @ ((kr.transpose(-2, -1) @ v) * attn.temperature.detach().double()) / denom
    real = torch.ones(1, 1, 30, 1, dtype=torch.float64)
    torch.testing.assert_close(attn._global(q, k, v, real), expected, rtol=1e-10, atol=1e-12)


def test_window_branch_stays_in_its_window():
    attn = create_attention("l2vit", "NS", 1, 4, window=5)
    q, k, v = random_qkv(1, 1, 1, 20, 20, 4)
    out = attn._windows(q, k, v, None)
    (grad,) = torch.autograd.grad(out[0, 0, 7].sum(), k)
    assert (grad[0, 0].abs().sum(-1) > 0).nonzero().flatten().tolist() == [5, 6, 7, 8, 9]
