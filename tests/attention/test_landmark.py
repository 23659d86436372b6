"""landmark: forward vs its explicit grouped-softmax loop (outputs and gradients), the one-token-block limit where
the grouped softmax is exact attention (test_every_attention.py), the retrieval budget, causality, conformance."""

import pytest

from cab import create_attention
from tests.attn_helpers import SHAPES_SHORT, assert_causal_prefixes_match, assert_reference_agrees, random_qkv

SMALL = {"block_size": 5, "topk": 2}


@pytest.mark.parametrize("pattern,lq,lk", SHAPES_SHORT)
def test_forward_matches_reference_with_gradients(pattern, lq, lk):
    attn = create_attention("landmark", pattern, 4, 8, block_size=3, topk=2)
    assert_reference_agrees(attn, lq, lk)


def test_retrieval_budget():
    """NS, 40 keys in blocks of 4: every row scores its own 4 tokens and 2 retrieved blocks of 4."""
    attn = create_attention("landmark", "NS", 2, 8, block_size=4, topk=2)
    q, k, v = (t.detach() for t in random_qkv(1, 2, 2, 40, 40, 8))
    assert attn.computed_pairs(q, k, v) == 2 * 40 * 12


def test_causal_rows_ignore_the_future():
    attn = create_attention("landmark", "CS", 2, 8, **SMALL)
    assert_causal_prefixes_match(attn)
