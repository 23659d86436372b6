"""hip: forward vs its row-by-row tree search (outputs and gradients), exactness within the budget, the
budget of kept keys, padding holes skipped by rank, causality, conformance."""

import pytest
import torch

from tests.attn_helpers import assert_causal_prefixes_match, assert_forward_matches_reference, holey_padding, random_qkv
from cab import create_attention
from cab.patterns import attention_mask

SMALL = {"topk": 3, "block_size": 4}


@pytest.mark.parametrize("pattern,lq,lk", [
    ("NS", 23, 23), ("CS", 23, 23), ("CS", 19, 27), ("CS", 27, 19), ("NC", 27, 19), ("CC", 19, 27),
])
def test_forward_matches_reference_with_gradients(pattern, lq, lk):
    attn = create_attention("hip", pattern, 4, 8, topk=2, block_size=2)
    q, k, v = random_qkv(2, 4, 2, lq, lk, 8)
    assert_forward_matches_reference(attn, q, k, v, holey_padding(lk))


@pytest.mark.parametrize("pattern", ["NS", "CS", "CC"])
def test_budget_covering_every_key_is_exact_attention(pattern):
    lq, lk = (30, 23) if pattern == "CC" else (30, 30)
    attn = create_attention("hip", pattern, 2, 8, topk=4, block_size=8)
    q, k, v = (t.detach() for t in random_qkv(2, 2, 2, lq, lk, 8))
    pad = holey_padding(lk)
    mask = attention_mask(pattern, lq, lk, pad)
    exact = torch.softmax((q @ k.transpose(-1, -2) / 8 ** 0.5).masked_fill(~mask, float("-inf")), -1) @ v
    torch.testing.assert_close(attn(q, k, v, pad), exact)
    assert attn.computed_pairs(q, k, v, pad) == int(mask.expand(2, 2, lq, lk).sum())


def test_kept_keys_fill_the_budget():
    """Past the budget every row keeps exactly k segments of b_k keys when the segment lengths allow it
    (64 real keys, k = 4, b_k = 4: four halvings of 16-key segments down to 4 keys)."""
    attn = create_attention("hip", "NS", 2, 8, topk=4, block_size=4)
    q, k, v = (t.detach() for t in random_qkv(1, 2, 2, 64, 64, 8))
    assert attn.computed_pairs(q, k, v) == 2 * 64 * 16


def test_causal_rows_ignore_the_future():
    attn = create_attention("hip", "CS", 2, 8, **SMALL)
    assert_causal_prefixes_match(attn)
