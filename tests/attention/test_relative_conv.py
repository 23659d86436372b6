"""rcmha (M61.rcmha): blocked forward vs the reference with explicit convolution sums and per-row relative
scores (outputs and gradients incl. the learned kernels and embeddings, NS/CS, unequal lengths, holey
padding, GQA); identity kernels and zero embeddings give softmax attention; a one-step delay kernel and the
relative embeddings checked by hand; cross patterns refused; conformance."""

import math

import pytest
import torch

from cab import create_attention
from tests.attn_helpers import assert_reference_agrees, holey_padding, random_qkv


@pytest.mark.parametrize("pattern,lq,lk", [("NS", 17, 17), ("CS", 17, 17), ("CS", 7, 15), ("CS", 15, 7)])
def test_forward_matches_reference(pattern, lq, lk):
    attn = create_attention("rcmha", pattern, 4, 8, chunk_size=8, max_distance=4, init_std=0.3).double()
    assert_reference_agrees(attn, lq, lk, params=(attn.conv_q, attn.conv_k, attn.conv_v, attn.relative))


def _plain(pattern, **hparams):
    attn = create_attention("rcmha", pattern, 2, 8, init_std=0.0, **hparams).double()
    with torch.no_grad():
        attn.relative.zero_()
    return attn


@pytest.mark.parametrize("pattern", ["NS", "CS"])
def test_identity_kernels_and_zero_embeddings_are_softmax_attention(pattern):
    q, k, v = (t.detach() for t in random_qkv(2, 2, 2, 13, 13, 8))
    pad = holey_padding(13)
    out, expected = _plain(pattern)(q, k, v, pad), create_attention("vanilla", pattern, 2, 8)(q, k, v, pad)
    real = ~pad[:, None, :, None]  # rows at padded positions have their query zeroed: their output is not used
    torch.testing.assert_close(out * real, expected * real)


def test_delay_kernel_shifts_the_queries():
    """conv_q = a delta one step back: query i is replaced by query i-1 (query 0 by zeros: uniform weights)."""
    attn = _plain("NS")
    with torch.no_grad():
        attn.conv_q.zero_()
        attn.conv_q[..., -2] = 1.0
    q, k, v = (t.detach() for t in random_qkv(1, 2, 2, 9, 9, 8))
    shifted = torch.cat([torch.zeros_like(q[..., :1, :]), q[..., :-1, :]], dim=-2)
    torch.testing.assert_close(attn(q, k, v), create_attention("vanilla", "NS", 2, 8)(shifted, k, v))


def test_relative_embeddings_by_hand():
    """k = 0, one head, d = 2, R = 1: e_ij = q_i . r_clip(j - i) / sqrt(2), checked with `math`."""
    attn = create_attention("rcmha", "NS", 1, 2, init_std=0.0, max_distance=1).double()
    table = [[0.5, -1.0], [0.0, 0.0], [2.0, 1.0]]  # r_-1, r_0, r_+1
    with torch.no_grad():
        attn.relative.copy_(torch.tensor(table))
    qs = [[1.0, 0.5], [-1.0, 2.0], [0.3, 0.3]]
    vs = [[1.0, 0.0], [0.0, 1.0], [2.0, -1.0]]
    q = torch.tensor(qs, dtype=torch.float64)[None, None]
    v = torch.tensor(vs, dtype=torch.float64)[None, None]
    out = attn(q, torch.zeros_like(q), v)[0, 0]
    for i in range(3):
        e = [sum(a * b for a, b in zip(qs[i], table[max(-1, min(1, j - i)) + 1])) / math.sqrt(2) for j in range(3)]
        w = [math.exp(x) / sum(math.exp(y) for y in e) for x in e]
        expected = [sum(w[j] * vs[j][c] for j in range(3)) for c in range(2)]
        torch.testing.assert_close(out[i], torch.tensor(expected, dtype=torch.float64))
