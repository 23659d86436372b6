"""biformer: forward vs its explicit routing loop (outputs and gradients), exactness when every region is
routed, causality of the per-query causal routing, computed pairs, conformance with small regions."""

import pytest
import torch

from tests.attn_helpers import assert_causal_prefixes_match, assert_forward_matches_reference, holey_padding, random_qkv
from cab import create_attention
from cab.patterns import attention_mask

SMALL = {"region_size": 8, "topk": 2}


@pytest.mark.parametrize("pattern,lq,lk", [
    ("NS", 23, 23), ("CS", 23, 23), ("CS", 19, 27), ("CS", 27, 19), ("NC", 27, 19), ("CC", 19, 27),
])
def test_forward_matches_reference_with_gradients(pattern, lq, lk):
    attn = create_attention("biformer", pattern, 4, 8, region_size=5, topk=3)
    q, k, v = random_qkv(2, 4, 2, lq, lk, 8)
    assert_forward_matches_reference(attn, q, k, v, holey_padding(lk))


@pytest.mark.parametrize("pattern", ["NS", "CS", "NC", "CC"])
def test_all_regions_routed_is_exact_attention(pattern):
    lq, lk = (30, 23) if pattern in ("NC", "CC") else (30, 30)
    attn = create_attention("biformer", pattern, 2, 8, region_size=4, topk=8)
    q, k, v = (t.detach() for t in random_qkv(2, 2, 2, lq, lk, 8))
    pad = holey_padding(lk)
    mask = attention_mask(pattern, lq, lk, pad)
    s = (q @ k.transpose(-1, -2) / 8 ** 0.5).masked_fill(~mask, float("-inf"))
    exact = torch.softmax(s, -1) @ v
    torch.testing.assert_close(attn(q, k, v, pad), exact)
    assert attn.computed_pairs(q, k, v, pad) == int(mask.expand(2, 2, lq, lk).sum())


def test_routing_is_sparse_and_counted():
    attn = create_attention("biformer", "NS", 2, 8, region_size=4, topk=2)
    q, k, v = (t.detach() for t in random_qkv(1, 2, 2, 40, 40, 8))
    # every query group of 4 sees exactly 2 regions of 4 keys
    assert attn.computed_pairs(q, k, v) == 2 * 40 * 8


def test_causal_rows_ignore_the_future():
    attn = create_attention("biformer", "CS", 2, 8, region_size=4, topk=2)
    assert_causal_prefixes_match(attn)
