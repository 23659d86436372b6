"""landmark: forward vs its explicit grouped-softmax loop (outputs and gradients), the one-token-block
limit where the grouped softmax is exact attention, the retrieval budget, causality, conformance."""

import pytest
import torch

from tests.attn_helpers import assert_causal_prefixes_match, assert_forward_matches_reference, holey_padding, random_qkv
from cab import create_attention
from cab.patterns import attention_mask

SMALL = {"block_size": 5, "topk": 2}


@pytest.mark.parametrize("pattern,lq,lk", [
    ("NS", 23, 23), ("CS", 23, 23), ("CS", 19, 27), ("CS", 27, 19), ("NC", 27, 19), ("CC", 19, 27),
])
def test_forward_matches_reference_with_gradients(pattern, lq, lk):
    attn = create_attention("landmark", pattern, 4, 8, block_size=3, topk=2)
    q, k, v = random_qkv(2, 4, 2, lq, lk, 8)
    assert_forward_matches_reference(attn, q, k, v, holey_padding(lk))


@pytest.mark.parametrize("pattern", ["NS", "CS", "NC", "CC"])
def test_one_token_blocks_all_retrieved_is_exact_attention(pattern):
    """With l = 1 a landmark is its key and the inner softmax has one term, so retrieving every block
    makes the grouped softmax plain softmax attention."""
    lq, lk = (30, 23) if pattern in ("NC", "CC") else (30, 30)
    attn = create_attention("landmark", pattern, 2, 8, block_size=1, topk=64)
    q, k, v = (t.detach() for t in random_qkv(2, 2, 2, lq, lk, 8))
    pad = holey_padding(lk)
    mask = attention_mask(pattern, lq, lk, pad)
    exact = torch.softmax((q @ k.transpose(-1, -2) / 8 ** 0.5).masked_fill(~mask, float("-inf")), -1) @ v
    torch.testing.assert_close(attn(q, k, v, pad), exact)
    assert attn.computed_pairs(q, k, v, pad) == int(mask.expand(2, 2, lq, lk).sum())


def test_retrieval_budget():
    """NS, 40 keys in blocks of 4: every row scores its own 4 tokens and 2 retrieved blocks of 4."""
    attn = create_attention("landmark", "NS", 2, 8, block_size=4, topk=2)
    q, k, v = (t.detach() for t in random_qkv(1, 2, 2, 40, 40, 8))
    assert attn.computed_pairs(q, k, v) == 2 * 40 * 12


def test_causal_rows_ignore_the_future():
    attn = create_attention("landmark", "CS", 2, 8, **SMALL)
    assert_causal_prefixes_match(attn)
