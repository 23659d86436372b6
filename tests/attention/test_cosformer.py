"""cosformer: forward vs its naive reference, the paper's formula written out, the re-weighting horizon M
(padding-aware when noncausal, constant when causal), and conformance."""

import math

import pytest
import torch

from cab import create_attention
from cab.attention.cosformer import CAUSAL_MAX_LEN
from tests.attn_helpers import assert_forward_matches_reference, holey_padding, random_qkv

_inputs = random_qkv


@pytest.mark.parametrize("pattern,lq,lk,max_len", [
    ("NS", 37, 37, None), ("NS", 20, 20, 64), ("CS", 70, 70, None), ("CS", 5, 12, 40), ("CS", 12, 5, None),
    ("NC", 23, 41, None), ("CC", 41, 23, 100),
])
def test_forward_matches_reference_with_gradients(pattern, lq, lk, max_len):
    attn = create_attention("cosformer", pattern, 4, 8, max_len=max_len)
    q, k, v = _inputs(2, 4, 2, lq, lk, 8)
    assert_forward_matches_reference(attn, q, k, v, holey_padding(lk))


def _paper(q, k, v, horizon, causal=False):
    """Eq. 9-11 of the paper as CAB's left_product wrote it: 1-based positions i, j, weights
    relu(q_i) relu(k_j) cos(pi/2 (i - j) / M), row-normalised (a row of zero weights, 0/0, counts as 0)."""
    i = torch.arange(1, q.shape[-2] + 1, dtype=q.dtype)[:, None]
    j = torch.arange(1, k.shape[-2] + 1, dtype=q.dtype)[None, :]
    weights = torch.relu(q) @ torch.relu(k).transpose(-1, -2) * torch.cos(math.pi / 2 * (i - j) / horizon)
    if causal:
        weights = weights.tril()
    return torch.nan_to_num(weights @ v / weights.sum(-1, keepdim=True), nan=0.0)


def test_matches_the_paper_formula():
    q, k, v = (t.detach() for t in _inputs(2, 2, 2, 30, 30, 8))
    torch.testing.assert_close(create_attention("cosformer", "NS", 2, 8)(q, k, v), _paper(q, k, v, 30))
    q2, k2, v2 = (t.detach() for t in _inputs(1, 2, 2, 17, 29, 8, seed=1))
    torch.testing.assert_close(create_attention("cosformer", "NC", 2, 8)(q2, k2, v2), _paper(q2, k2, v2, 29))
    causal = create_attention("cosformer", "CS", 2, 8, max_len=50)
    torch.testing.assert_close(causal(q, k, v), _paper(q, k, v, 50, causal=True))
    default = create_attention("cosformer", "CS", 2, 8)
    torch.testing.assert_close(default(q, k, v), _paper(q, k, v, CAUSAL_MAX_LEN, causal=True))


def test_noncausal_horizon_spans_the_real_positions():
    attn = create_attention("cosformer", "NS", 1, 4)
    pad = torch.zeros(3, 10, dtype=torch.bool)
    pad[1, 7:] = True  # trailing padding: M is the real length
    pad[2, :4] = True  # leading padding: the real positions still reach the end
    assert attn.horizon(10, 10, pad, "cpu").flatten().tolist() == [10, 7, 10]
    cross = create_attention("cosformer", "NC", 1, 4)
    assert cross.horizon(12, 10, pad, "cpu").flatten().tolist() == [12, 12, 12]  # queries span 12
    assert cross.horizon(5, 10, pad, "cpu").flatten().tolist() == [10, 7, 10]


def test_causal_horizon_is_a_constant_and_longer_inputs_raise():
    attn = create_attention("cosformer", "CS", 1, 4, max_len=16)
    assert float(attn.horizon(3, 3, None, "cpu")) == float(attn.horizon(16, 16, None, "cpu")) == 16
    q, k, v = (t.detach() for t in _inputs(1, 1, 1, 17, 17, 4))
    with pytest.raises(ValueError, match="max_len"):
        attn(q, k, v)
    with pytest.raises(ValueError, match="max_len"):
        create_attention("cosformer", "NS", 1, 4, max_len=16)(q, k, v)


def test_rows_with_all_zero_weights_output_zero():
    """relu(q) = 0 makes every weight 0: the row outputs 0 (CAB divided by a 1e-6 clamp)."""
    q, k, v = (t.detach() for t in _inputs(1, 1, 1, 6, 6, 4))
    q[..., 2, :] = -1.0
    for pattern in ("NS", "CS"):
        out = create_attention("cosformer", pattern, 1, 4)(q, k, v)
        assert torch.isfinite(out).all()
        assert torch.equal(out[0, 0, 2], torch.zeros(4, dtype=out.dtype))
