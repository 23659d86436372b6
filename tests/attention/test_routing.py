"""routing: forward vs its explicit clustering loop (outputs and gradients), one cluster = exact attention
(test_every_attention.py), the pairs computed are the same-cluster pairs, the EMA update (training mode, opt-in),
causality, conformance."""

import pytest
import torch

from cab import create_attention
from tests.attn_helpers import SHAPES_SHORT, assert_causal_prefixes_match, assert_reference_agrees, random_qkv

SMALL = {"num_clusters": 4}


@pytest.mark.parametrize("pattern,lq,lk", SHAPES_SHORT)
def test_forward_matches_reference_with_gradients(pattern, lq, lk):
    attn = create_attention("routing", pattern, 4, 8, num_clusters=3)
    assert_reference_agrees(attn, lq, lk)


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

    def sim(mu):
        return torch.einsum("bhld,hcd->bhlc", xn, mu.to(xn)).amax(-1).mean()

    assert sim(moved) > sim(before)
    online.eval()
    online(q, k, v)
    assert torch.equal(online.centroids, moved)
    del first


def test_causal_rows_ignore_the_future():
    attn = create_attention("routing", "CS", 2, 8, **SMALL)
    assert_causal_prefixes_match(attn)
