"""hip: forward vs its row-by-row tree search (outputs and gradients), exactness within the budget
(test_every_attention.py), the budget of kept keys, padding holes skipped by rank, causality, conformance."""

import pytest

from cab import create_attention
from tests.attn_helpers import SHAPES_SHORT, assert_causal_prefixes_match, assert_reference_agrees, random_qkv

SMALL = {"topk": 3, "block_size": 4}


@pytest.mark.parametrize("pattern,lq,lk", SHAPES_SHORT)
def test_forward_matches_reference_with_gradients(pattern, lq, lk):
    attn = create_attention("hip", pattern, 4, 8, topk=2, block_size=2)
    assert_reference_agrees(attn, lq, lk)


def test_kept_keys_fill_the_budget():
    """Past the budget every row keeps exactly k segments of b_k keys when the segment lengths allow it
    (128 real keys, past the dense path's 4 k b_k = 64; k = 4, b_k = 4: halvings of 32-key segments down to 4
    keys); up to 4 k b_k keys every row scores every key, and computed_pairs says so."""
    attn = create_attention("hip", "NS", 2, 8, topk=4, block_size=4)
    q, k, v = (t.detach() for t in random_qkv(1, 2, 2, 128, 128, 8))
    assert attn.computed_pairs(q, k, v) == 2 * 128 * 16
    q, k, v = (t.detach() for t in random_qkv(1, 2, 2, 64, 64, 8))
    assert attn.computed_pairs(q, k, v) == 2 * 64 * 64


def test_causal_rows_ignore_the_future():
    attn = create_attention("hip", "CS", 2, 8, **SMALL)
    assert_causal_prefixes_match(attn)
