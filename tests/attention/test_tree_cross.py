"""tree_cross (M62): forward vs the explicit-range reference (outputs and gradients, GQA, holey padding,
Lq != Lk, Lk not a power of two, Lk = 1), the retrieved nodes partition the real keys, equality with exact
attention when all keys coincide, the descent follows the larger child score, decoding, conformance."""

import math

import pytest
import torch

from cab import create_attention
from tests.attn_helpers import assert_forward_matches_reference, holey_padding, random_qkv


@pytest.mark.parametrize("pattern,lq,lk,hkv", [("NC", 13, 29, 1), ("CC", 9, 16, 2), ("NC", 7, 1, 2),
                                               ("CC", 11, 37, 2)])
def test_forward_matches_reference_with_gradients(pattern, lq, lk, hkv):
    attn = create_attention("tree_cross", pattern, 2, 8)
    q, k, v = random_qkv(2, 2, hkv, lq, lk, 8)
    assert_forward_matches_reference(attn, q, k, v, holey_padding(lk) if lk >= 4 else None)


def test_retrieved_nodes_partition_the_real_keys_and_match_exact_attention_on_equal_keys():
    """All keys equal: every node's score is the same, so the weights are n / N over a set of nodes that
    covers each real key once; with one-hot values the output is the uniform 1/N over the real keys, which is
    also exact softmax attention's output."""
    lk = 21
    pad = holey_padding(lk)
    q = torch.randn(2, 2, 5, 4, dtype=torch.float64)
    k = torch.ones(2, 2, lk, 4, dtype=torch.float64) * 0.3
    v = torch.eye(lk, dtype=torch.float64).expand(2, 2, lk, lk)
    out = create_attention("tree_cross", "NC", 2, 4)(q, k, v, pad)
    real = (~pad).double()
    torch.testing.assert_close(out, (real / real.sum(-1, keepdim=True))[:, None, None].expand_as(out))
    exact = create_attention("vanilla", "NC", 2, 4)(q, k, v, pad)
    torch.testing.assert_close(out, exact)


def test_descent_takes_the_higher_scoring_child_and_retrieves_log_many_nodes():
    """Keys 0..7 in d=1: k_j = j - 3.5; a positive query prefers larger keys, so it descends to leaf 7 and
    retrieves [0..4), [4..6), {6}, {7}: the output is their softmax over mean score + log n."""
    k = (torch.arange(8, dtype=torch.float64) - 3.5).view(1, 1, 8, 1)
    v = torch.arange(8, dtype=torch.float64).view(1, 1, 8, 1)
    q = torch.tensor([[[[2.0]]]], dtype=torch.float64)
    attn = create_attention("tree_cross", "NC", 1, 1)
    nodes = [[0, 1, 2, 3], [4, 5], [6], [7]]
    scores = torch.tensor([2.0 * float(k[0, 0, n].mean()) + math.log(len(n)) for n in nodes])
    expect = torch.softmax(scores.double(), 0) @ torch.tensor([float(v[0, 0, n].mean()) for n in nodes]).double()
    torch.testing.assert_close(attn(q, k, v)[0, 0, 0, 0], expect)
    assert attn.computed_pairs(q, k, v) == 1 * (2 * 3 + 4)


def test_all_padded_row_outputs_zero():
    q, k, v = random_qkv(1, 2, 2, 3, 6, 4)
    out = create_attention("tree_cross", "CC", 2, 4)(q, k, v, torch.ones(1, 6, dtype=torch.bool))
    assert torch.equal(out, torch.zeros_like(out))


def test_decode_reuses_the_tree():
    attn = create_attention("tree_cross", "CC", 2, 8)
    q, k, v = (t.detach() for t in random_qkv(2, 2, 1, 5, 19, 8))
    pad = holey_padding(19)
    state = attn.decode_init(k, v, pad)
    rows = [attn.decode_step(state, q[:, :, i:i + 1])[0] for i in range(5)]
    torch.testing.assert_close(torch.cat(rows, 2), attn(q, k, v, pad))
