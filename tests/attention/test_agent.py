"""agent: forward vs its per-row reference (outputs and gradients), the pooling against torch's
adaptive_avg_pool1d, the two-softmax form against a dense expression, decoding, conformance."""

import pytest
import torch
import torch.nn.functional as F

from cab import create_attention
from cab.attention.agent import pooling_matrix
from tests.attn_helpers import assert_decode_matches_forward, assert_reference_agrees, random_qkv


@pytest.mark.parametrize("pattern,lq,lk,agents", [
    ("NS", 37, 37, 5), ("NS", 6, 6, 9), ("CS", 70, 70, 5), ("CS", 5, 12, 3), ("CS", 12, 5, 3),
    ("NC", 23, 41, 4), ("CC", 41, 23, 4),
])
def test_forward_matches_reference_with_gradients(pattern, lq, lk, agents):
    attn = create_attention("agent", pattern, 4, 8, num_agents=agents, seed=1)
    assert_reference_agrees(attn, lq, lk)


@pytest.mark.parametrize("length,agents", [(20, 7), (5, 9), (49, 49), (50, 49)])
def test_pooling_is_adaptive_average_pooling(length, agents):
    x = torch.randn(1, 3, length, dtype=torch.float64)
    pooled = pooling_matrix(length, agents, None, x.device, x.dtype) @ x.transpose(-1, -2)
    torch.testing.assert_close(pooled.transpose(-1, -2), F.adaptive_avg_pool1d(x, agents))
    real = torch.ones(1, length + 4, dtype=torch.bool)
    real[0, [0, 3, length + 2, length + 3]] = False  # holes: the real positions pool like the unpadded sequence
    padded = torch.zeros(1, 3, length + 4, dtype=torch.float64)
    padded[..., real[0]] = x
    pooled = pooling_matrix(length + 4, agents, real, x.device, x.dtype) @ padded.transpose(-1, -2)
    torch.testing.assert_close(pooled.transpose(-1, -2), F.adaptive_avg_pool1d(x, agents))


def test_noncausal_is_the_two_softmax_product():
    """O = softmax(Q A^T s) softmax(A K^T s) V + DWC(V) with A = adaptive_avg_pool(Q) and a zero-padded
    depthwise conv1d."""
    attn = create_attention("agent", "NS", 2, 8, num_agents=6, seed=2)
    q, k, v = (t.detach() for t in random_qkv(1, 2, 2, 30, 30, 8))
    s = 8 ** -0.5
    a = F.adaptive_avg_pool1d(q.flatten(0, 1).transpose(-1, -2), 6).transpose(-1, -2).reshape(1, 2, 6, 8)
    expected = torch.softmax(q @ a.transpose(-1, -2) * s, -1) @ torch.softmax(a @ k.transpose(-1, -2) * s, -1) @ v
    conv = F.conv1d(v.flatten(0, 1).transpose(-1, -2).reshape(1, 16, 30), attn.dwc.detach().double().reshape(16, 1, 3),
                    padding=1, groups=16)
    expected = expected + conv.reshape(1, 2, 8, 30).transpose(-1, -2)
    torch.testing.assert_close(attn(q, k, v), expected, rtol=1e-10, atol=1e-12)


def test_decode_matches_forward():
    attn = create_attention("agent", "CS", 4, 8, num_agents=5, seed=3)
    for start, end in assert_decode_matches_forward(attn, prefills=(0, 1, 9)):
        assert end == start
