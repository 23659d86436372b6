"""swat (SWAT, M30): forward vs the dense reference (outputs, gradients, padding, GQA), against an independent
per-row loop with complex-number rotary embeddings, the balanced ALiBi slopes, sigmoid's missing
normalisation, no FlexAttention backend, conformance."""

import math

import pytest
import torch

from cab import UnsupportedPattern, create_attention
from cab.attention.swat import balanced_alibi_slopes
from cab.registry import UnknownHyperparameter
from tests.attn_helpers import assert_block_layout_matches_reference, holey_padding, random_qkv


@pytest.mark.parametrize("pattern,window,lq,lk",
                         [("NS", 5, 45, 45), ("CS", 5, 50, 50), ("CS", 4, 20, 33), ("NS", 0, 9, 9)])
def test_forward_matches_reference(pattern, window, lq, lk):
    attn = create_attention("swat", pattern, 4, 8, window=window)
    assert_block_layout_matches_reference(attn, lq, lk)


def _loop(q, k, v, pad, window, slopes, causal, base=10000.0):
    """Per row: rotate q_i and k_j as complex numbers (channel c with c + D/2) by e^{i p theta_c}, then
    sum_j sigmoid(Re<q~, conj k~> / sqrt(D) + s_h |i - j|) v_j over the window's real keys."""
    b, h, lq, d = q.shape
    lk = k.shape[2]
    offset = lk - lq if causal else 0
    half = d // 2
    theta = torch.tensor([base ** (-2 * c / d) for c in range(half)], dtype=torch.float64)

    def rot(x, pos):
        z = torch.complex(x[:half], x[half:]) * torch.exp(1j * pos * theta)
        return z

    out = torch.zeros(b, h, lq, d, dtype=torch.float64)
    for bb in range(b):
        for hh in range(h):
            for i in range(lq):
                p = i + offset
                qi = rot(q[bb, hh, i], p)
                for j in range(lk):
                    if pad[bb, j] or (p - j > window) or (p - j < 0 if causal else j - p > window):
                        continue
                    kj = rot(k[bb, hh, j], j)
                    score = (qi * kj.conj()).real.sum() / math.sqrt(d) + slopes[hh] * abs(p - j)
                    out[bb, hh, i] += torch.sigmoid(score) * v[bb, hh, j]
    return out


@pytest.mark.parametrize("pattern", ["NS", "CS"])
def test_matches_an_independent_loop(pattern):
    attn = create_attention("swat", pattern, 4, 8, window=3)
    q, k, v = (t.detach() for t in random_qkv(2, 4, 4, 13, 13, 8))
    pad = holey_padding(13)
    torch.testing.assert_close(attn(q, k, v, pad), _loop(q, k, v, pad, 3, attn.slopes, pattern == "CS"),
                               rtol=1e-10, atol=1e-12)


def test_balanced_alibi_slopes():
    slopes = balanced_alibi_slopes(8)
    geometric = torch.tensor([2.0 ** (-8.0 * (k + 1) / 4) for k in range(4)], dtype=torch.float64)
    assert torch.equal(slopes, torch.cat([-geometric, geometric]))
    assert (balanced_alibi_slopes(3) < 0).sum() == 2


def test_sigmoid_weights_are_not_normalised():
    """Constant values: softmax would give v exactly; sigmoid gives v times the sum of the weights."""
    attn = create_attention("swat", "CS", 1, 4, window=2)
    q, k = torch.zeros(1, 1, 6, 4, dtype=torch.float64), torch.zeros(1, 1, 6, 4, dtype=torch.float64)
    v = torch.ones(1, 1, 6, 4, dtype=torch.float64)
    out = attn(q, k, v)[0, 0, :, 0]  # one head: slope -1/2^8 ... per distance
    s = float(attn.slopes[0])
    expected = [sum(1 / (1 + math.exp(-s * g)) for g in range(min(i, 2) + 1)) for i in range(6)]
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64))


def test_no_flex_backend_and_no_cross():
    with pytest.raises(UnknownHyperparameter, match="backend"):  # FlexAttention normalises by softmax only
        create_attention("swat", "CS", 2, 8, backend="flex")
    for pattern in ("NC", "CC"):
        with pytest.raises(UnsupportedPattern, match="position"):
            create_attention("swat", pattern, 2, 8)
