"""lean (M4): the online-softmax merge is exact and associative; forward and split-KV decoding equal exact
attention for every pattern, tile size and split count."""

import pytest
import torch

from cab import create_attention
from cab.attention.lean import merge, merge_tree, partial_attention
from tests.attn_helpers import assert_reference_agrees, holey_padding, random_qkv


def _softmax_attention(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1) @ v


@pytest.mark.parametrize("cuts", [[0, 40], [0, 1, 40], [0, 7, 8, 23, 40], [0, 13, 27, 39, 40]])
def test_merging_partials_over_any_split_is_softmax_attention(cuts):
    q, k, v = (t.detach() for t in random_qkv(2, 3, 3, 5, 40, 8))
    visible = torch.ones(1, 1, 5, 40, dtype=torch.bool)
    parts = [partial_attention(q, k[:, :, a:b], v[:, :, a:b], visible[..., a:b], 8 ** -0.5)
             for a, b in zip(cuts, cuts[1:])]
    torch.testing.assert_close(merge_tree(parts).normalised(), _softmax_attention(q, k, v), rtol=1e-12, atol=1e-13)


def test_merge_is_associative_and_commutative_and_handles_empty_sides():
    q, k, v = (t.detach() for t in random_qkv(1, 2, 2, 4, 30, 8, seed=3))
    visible = torch.ones(1, 1, 4, 30, dtype=torch.bool)
    visible[..., 0, 10:20] = False  # row 0 sees nothing in the middle part
    a, b, c = (partial_attention(q, k[:, :, s:s + 10], v[:, :, s:s + 10], visible[..., s:s + 10], 0.3)
               for s in (0, 10, 20))
    left, right = merge(merge(a, b), c), merge(a, merge(b, c))
    swapped = merge(c, merge(b, a))
    for other in (right, swapped):
        for x, y in ((left.m, other.m), (left.l, other.l), (left.o, other.o)):
            torch.testing.assert_close(x, y, rtol=1e-13, atol=1e-14)
    assert torch.isinf(b.m[0, :, 0]).all() and (b.l[0, :, 0] == 0).all()


@pytest.mark.parametrize("pattern,lq,lk", [("NS", 37, 37), ("CS", 41, 41), ("CS", 9, 30), ("NC", 23, 41),
                                           ("CC", 41, 23)])
@pytest.mark.parametrize("tile", [1, 8, 64])
def test_forward_matches_reference_with_gradients(pattern, lq, lk, tile):
    attn = create_attention("lean", pattern, 4, 8, tile_size=tile)
    assert_reference_agrees(attn, lq, lk)


@pytest.mark.parametrize("pattern", ["CS", "CC"])
@pytest.mark.parametrize("splits", [1, 3, 7])
def test_split_kv_decoding_reproduces_forward(pattern, splits):
    attn = create_attention("lean", pattern, 4, 8, num_splits=splits)
    q, k, v = (t.detach() for t in random_qkv(2, 4, 2, 12, 12 if pattern == "CS" else 19, 8))
    pad = holey_padding(k.shape[-2])
    full = attn(q, k, v, pad)
    if pattern == "CC":
        state = attn.decode_init(k, v, pad)
        rows = [attn.decode_step(state, q[:, :, i:i + 1])[0] for i in range(q.shape[-2])]
    else:
        state, rows = attn.decode_init(k[:, :, :0], v[:, :, :0], pad[:, :0], capacity=12), []
        for i in range(12):
            out, state = attn.decode_step(state, q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1])
            rows.append(out)
        # decoding feeds every token as real: compare with the unpadded forward
        full = attn(q, k, v)
    torch.testing.assert_close(torch.cat(rows, dim=2), full, rtol=1e-10, atol=1e-12)


def test_splits_cover_the_cache_exactly():
    attn = create_attention("lean", "CS", 2, 8, tile_size=4)
    assert attn.splits(10) == [(0, 3), (3, 7), (7, 10)]  # ceil(10 / 4) near-equal splits
    assert create_attention("lean", "CS", 2, 8, num_splits=16).splits(3) == [(0, 1), (1, 2), (2, 3)]
