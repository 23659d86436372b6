"""routing: forward vs its explicit clustering loop (outputs and gradients), one cluster = exact attention,
the pairs computed are the same-cluster pairs, the EMA update (training mode, opt-in), causality,
conformance."""

import pytest
import torch

from tests.attn_helpers import assert_causal_prefixes_match, assert_forward_matches_reference, holey_padding, random_qkv
from cab import create_attention
from cab.patterns import attention_mask

SMALL = {"num_clusters": 4}


@pytest.mark.parametrize("pattern,lq,lk", [
    ("NS", 23, 23), ("CS", 23, 23), ("CS", 19, 27), ("CS", 27, 19), ("NC", 27, 19), ("CC", 19, 27),
])
def test_forward_matches_reference_with_gradients(pattern, lq, lk):
    attn = create_attention("routing", pattern, 4, 8, num_clusters=3)
    q, k, v = random_qkv(2, 4, 2, lq, lk, 8)
    assert_forward_matches_reference(attn, q, k, v, holey_padding(lk))


@pytest.mark.parametrize("pattern", ["NS", "CS", "CC"])
def test_one_cluster_is_exact_attention(pattern):
    lq, lk = (30, 23) if pattern == "CC" else (30, 30)
    attn = create_attention("routing", pattern, 2, 8, num_clusters=1)
    q, k, v = (t.detach() for t in random_qkv(2, 2, 2, lq, lk, 8))
    pad = holey_padding(lk)
    mask = attention_mask(pattern, lq, lk, pad)
    exact = torch.softmax((q @ k.transpose(-1, -2) / 8 ** 0.5).masked_fill(~mask, float("-inf")), -1) @ v
    torch.testing.assert_close(attn(q, k, v, pad), exact)


def test_pairs_are_the_same_cluster_pairs():
    attn = create_attention("routing", "NS", 2, 8, num_clusters=5)
    q, k, v = (t.detach() for t in random_qkv(1, 2, 2, 60, 60, 8))
    same = attn.assign(q)[..., :, None] == attn.assign(k)[..., None, :]
    assert attn.computed_pairs(q, k, v) == int(same.sum())
    assert 0 < int(same.sum()) < 2 * 60 * 60 / 2


def test_ema_update_moves_centroids_only_when_enabled_in_training():
    q, k, v = (t.detach() for t in random_qkv(1, 2, 2, 40, 40, 8))
    fixed = create_attention("routing", "CS", 2, 8, num_clusters=4)
    before = fixed.centroids.clone()
    fixed(q, k, v)
    assert torch.equal(fixed.centroids, before)
    online = create_attention("routing", "CS", 2, 8, num_clusters=4, update_centroids=True, ema_decay=0.5)
    first = online(q, k, v)
    moved = online.centroids.clone()
    assert not torch.equal(moved, before)
    torch.testing.assert_close(moved.norm(dim=-1), torch.ones(2, 4))
    # the update is the EMA towards the mean of the assigned normalised tokens: it raises their similarity
    xn = torch.cat([q, k], 2) / torch.cat([q, k], 2).norm(dim=-1, keepdim=True)
    sim = lambda mu: torch.einsum("bhld,hcd->bhlc", xn, mu.to(xn)).amax(-1).mean()
    assert sim(moved) > sim(before)
    online.eval()
    online(q, k, v)
    assert torch.equal(online.centroids, moved)
    del first


def test_causal_rows_ignore_the_future():
    attn = create_attention("routing", "CS", 2, 8, **SMALL)
    assert_causal_prefixes_match(attn)
