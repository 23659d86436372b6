"""biformer: forward vs its explicit routing loop (outputs and gradients), exactness when every region is routed
(test_every_attention.py), causality of the per-query causal routing, computed pairs, conformance with small
regions."""

import pytest

from cab import create_attention
from tests.attn_helpers import SHAPES_SHORT, assert_causal_prefixes_match, assert_reference_agrees, random_qkv

SMALL = {"region_size": 8, "topk": 2}


@pytest.mark.parametrize("pattern,lq,lk", SHAPES_SHORT)
def test_forward_matches_reference_with_gradients(pattern, lq, lk):
    attn = create_attention("biformer", pattern, 4, 8, region_size=5, topk=3)
    assert_reference_agrees(attn, lq, lk)


def test_routing_is_sparse_and_counted():
    attn = create_attention("biformer", "NS", 2, 8, region_size=4, topk=2)
    q, k, v = (t.detach() for t in random_qkv(1, 2, 2, 40, 40, 8))
    # every query group of 4 sees exactly 2 regions of 4 keys
    assert attn.computed_pairs(q, k, v) == 2 * 40 * 8


def test_causal_rows_ignore_the_future():
    attn = create_attention("biformer", "CS", 2, 8, region_size=4, topk=2)
    assert_causal_prefixes_match(attn)
