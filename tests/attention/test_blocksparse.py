"""The shared block-sparse engine (cab/attention/engine/blocksparse.py): the gathered-block torch path against the
dense reference on random per-head block masks (outputs and gradients, padding, GQA, empty query blocks,
softmax and sigmoid), block lists from boxes against exhaustive evaluation, the FLOP and pair counts, the
FlexAttention BlockMask."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from cab.attention.engine import blocksparse as bs
from tests.attn_helpers import holey_padding, random_qkv


def _random_blocks(heads, lq, lk, bq, bk, seed=0):
    gen = torch.Generator().manual_seed(seed)
    blocks = torch.rand(heads, -(-lq // bq), -(-lk // bk), generator=gen) < 0.4
    blocks[:, 1] = False  # a query block that lists nothing outputs zeros
    return blocks


def _block_mask_fn(blocks, bq, bk, heads_vary):
    def mask(b, h, i, j):
        return blocks[h if heads_vary else 0, torch.div(i, bq, rounding_mode="floor"),
                      torch.div(j, bk, rounding_mode="floor")] & ((i + j) % 3 != 0)  # element-level holes too
    return mask


@pytest.mark.parametrize("heads_vary", [False, True])
@pytest.mark.parametrize("normalize", ["softmax", "sigmoid"])
def test_torch_path_matches_dense_reference(heads_vary, normalize):
    lq, lk, bq, bk = 37, 29, 8, 8
    blocks = _random_blocks(4 if heads_vary else 1, lq, lk, bq, bk)
    layout = bs.layout_from_block_mask(blocks, bq, bk, lq, lk)
    mask = _block_mask_fn(blocks, bq, bk, heads_vary)
    q, k, v = random_qkv(2, 4, 2, lq, lk, 8)
    pad = holey_padding(lk)

    def bias(scores, h, i, j):
        return scores + 0.1 * h.to(scores.dtype) - 0.01 * (i - j).abs().to(scores.dtype)

    out = bs.blocksparse_attention(q, k, v, layout, mask, pad, score_mod=bias, normalize=normalize)
    ref = bs.dense_reference(q, k, v, mask, heads_vary, pad, score_mod=bias, normalize=normalize)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    assert torch.equal(out[:, :, 8:16], torch.zeros_like(out[:, :, 8:16]))
    cot = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), cot), torch.autograd.grad(ref, (q, k, v), cot)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_layout_from_boxes_equals_exhaustive_evaluation():
    lq = lk = 70
    width, radius = 9, 2
    p = torch.arange(lq)
    r, c = p // width, p % width

    def mask(b, h, i, j):
        rows = torch.div(i, width, rounding_mode="floor") - torch.div(j, width, rounding_mode="floor")
        return (rows.abs() <= radius) & ((i % width - j % width).abs() <= radius)

    boxed = bs.layout_from_boxes([(r - radius, r + radius, c - radius, c + radius)], width, 8, 8, lq, lk)
    evaluated = bs.layout_by_evaluation(mask, 1, 8, 8, lq, lk)
    assert torch.equal(boxed.block_mask(), evaluated.block_mask())
    one_d = bs.layout_from_boxes([(p * 0, p * 0, p - 5, p + 3)], lk, 8, 8, lq, lk, extra_keys=3)
    evaluated = bs.layout_by_evaluation(lambda b, h, i, j: ((i - j) <= 5) & ((j - i) <= 3) | (j < 3), 1, 8, 8, lq, lk)
    assert torch.equal(one_d.block_mask(), evaluated.block_mask())
    assert bs.check_layout_covers(one_d, lambda b, h, i, j: (i - j).abs() <= 3, 1)
    assert not bs.check_layout_covers(one_d, lambda b, h, i, j: (i - j).abs() <= 12, 1)


@pytest.mark.parametrize("heads_vary", [False, True])
def test_flop_and_pair_counts(heads_vary):
    lq, lk, bq, bk = 37, 29, 8, 8
    blocks = _random_blocks(3 if heads_vary else 1, lq, lk, bq, bk, seed=1)
    layout = bs.layout_from_block_mask(blocks, bq, bk, lq, lk)
    q, k, v = (t.detach() for t in random_qkv(2, 3, 3, lq, lk, 16))
    with FlopCounterMode(display=False) as counter:
        bs.blocksparse_attention(q, k, v, layout, _block_mask_fn(blocks, bq, bk, heads_vary))
    assert counter.get_total_flops() == bs.layout_matmul_flops(layout, 2, 3, 16, 16)
    rows = torch.tensor([8, 8, 8, 8, 5])  # real rows per query block
    cols = torch.tensor([8, 8, 8, 5])
    per_head = (rows[:, None] * blocks.long() * cols[None, :]).sum((-1, -2))
    expected = 2 * int(per_head.sum()) * (1 if heads_vary else 3)
    assert bs.layout_pairs(layout, 2, 3) == expected


def test_flex_block_mask_matches_torch_path():
    """float64 runs FlexAttention's unfused path: the BlockMask, the per-head mask_mod and padding."""
    from cab.attention.flash import flex_call

    lq, lk = 200, 150
    blocks = _random_blocks(4, lq, lk, 128, 128)
    blocks[:, 1] = True
    layout = bs.layout_from_block_mask(blocks, 128, 128, lq, lk)
    mask = _block_mask_fn(blocks, 128, 128, True)
    q, k, v = (t.detach() for t in random_qkv(2, 4, 2, lq, lk, 8))
    pad = holey_padding(lk)
    block_mask = bs.flex_block_mask(layout, mask, 2, 4, pad, "cpu")
    torch.testing.assert_close(flex_call(q, k, v, block_mask), bs.dense_reference(q, k, v, mask, True, pad),
                               rtol=1e-10, atol=1e-12)
