"""softplus_attention (M51), relu_attention (M52), sigmoid_attention (M53): blocked forward vs the per-row
reference (outputs and gradients, every pattern, odd and unequal lengths, holey padding, GQA), the
formulas against a tiny example computed by hand with `math`, and conformance."""

import math

import pytest
import torch

from cab import create_attention
from tests.attn_helpers import assert_reference_agrees, random_qkv

NAMES = ["softplus_attention", "relu_attention", "sigmoid_attention"]
SHAPES = [("NS", 21, 21), ("CS", 21, 21), ("CS", 7, 19), ("CS", 19, 7), ("NC", 9, 19), ("CC", 19, 9)]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("pattern,lq,lk", SHAPES)
def test_forward_matches_reference(name, pattern, lq, lk):
    attn = create_attention(name, pattern, 4, 8, chunk_size=8)  # several blocks, a ragged last one
    assert_reference_agrees(attn, lq, lk)


# one query, three keys, d = 2: scores s = q.k / sqrt(2) = (2, -1, 0.5) / sqrt(2)
_Q = [[1.0, 0.0]]
_K = [[2.0, 0.0], [-1.0, 3.0], [0.5, -1.0]]
_V = [[1.0, 2.0], [3.0, -1.0], [-2.0, 0.5]]
_S = [2 / math.sqrt(2), -1 / math.sqrt(2), 0.5 / math.sqrt(2)]


def _run(name, **hparams):
    attn = create_attention(name, "NS", 1, 2, **hparams)
    t = lambda rows: torch.tensor(rows, dtype=torch.float64)[None, None]  # noqa: E731
    return attn(t(_Q), t(_K), t(_V))[0, 0, 0]


def _combine(weights):
    return torch.tensor([sum(w * v[c] for w, v in zip(weights, _V)) for c in range(2)], dtype=torch.float64)


def test_relu_by_hand():
    torch.testing.assert_close(_run("relu_attention"), _combine([max(s, 0) / 3 for s in _S]))
    torch.testing.assert_close(_run("relu_attention", normalize="none"), _combine([max(s, 0) for s in _S]))


def test_sigmoid_by_hand():
    expected = [1 / (1 + math.exp(-(s - math.log(3)))) for s in _S]  # b = -log(n), n = 3 keys
    torch.testing.assert_close(_run("sigmoid_attention"), _combine(expected))
    fixed = [1 / (1 + math.exp(-(s + 0.25))) for s in _S]
    torch.testing.assert_close(_run("sigmoid_attention", bias=0.25), _combine(fixed))


def test_softplus_by_hand():
    lam = math.log(3)
    a = [math.log(1 + math.exp(lam * s)) for s in _S]
    a = [x / sum(a) for x in a]
    torch.testing.assert_close(_run("softplus_attention", power=1.0), _combine(a))
    r = [x**3 for x in a]
    torch.testing.assert_close(_run("softplus_attention"), _combine([x / sum(r) for x in r]))
    plain = [math.log(1 + math.exp(s)) for s in _S]
    torch.testing.assert_close(_run("softplus_attention", power=1.0, length_scale=False),
                               _combine([x / sum(plain) for x in plain]))


def test_reweighting_sharpens():
    """Re-weighting moves mass to the largest weight: the top weight grows with the power."""
    q, k, v = (t.detach() for t in random_qkv(1, 1, 1, 1, 64, 8))
    eye = torch.eye(64, dtype=torch.float64)[None, None]  # values = one-hot: the output is the weights
    tops = [create_attention("softplus_attention", "NS", 1, 8, power=p)(q, k, eye).max().item() for p in (1, 2, 4)]
    assert tops[0] < tops[1] < tops[2]


def test_length_scale_uses_the_rows_own_key_count():
    """Causal row i's scale is log(i + 1): row 0 sees one key and outputs its value exactly; row i's output
    does not change when later tokens are appended (checked on a prefix)."""
    q, k, v = (t.detach() for t in random_qkv(1, 2, 2, 20, 20, 8))
    attn = create_attention("softplus_attention", "CS", 2, 8)
    full, prefix = attn(q, k, v), attn(q[..., :7, :], k[..., :7, :], v[..., :7, :])
    torch.testing.assert_close(full[..., 0, :], v[..., 0, :])
    torch.testing.assert_close(full[..., :7, :], prefix)


def test_relu_row_with_only_negative_scores_outputs_zero():
    q = torch.tensor([[[[1.0, 0.0]]]], dtype=torch.float64)
    k = torch.tensor([[[[-1.0, 0.0], [-2.0, 1.0]]]], dtype=torch.float64)
    v = torch.randn(1, 1, 2, 2, dtype=torch.float64)
    assert torch.equal(
        create_attention("relu_attention", "NS", 1, 2)(q, k, v), torch.zeros(1, 1, 1, 2, dtype=torch.float64)
    )
