"""halo (HaloNets, M33): forward vs the dense-mask reference (outputs, gradients, padding, GQA, 1-D and 2-D),
the haloed regions against a direct per-block construction, the block-diagonal limit, conformance."""

import pytest
import torch

from cab import create_attention
from tests.attn_helpers import assert_block_layout_matches_reference, holey_padding, random_qkv


@pytest.mark.parametrize("pattern,hparams,lq,lk", [
    ("NS", {"block": 8, "halo": 3}, 37, 37), ("CS", {"block": 8, "halo": 3}, 37, 37),
    ("NS", {"block": 4, "halo": 2, "width": 8}, 45, 45), ("CS", {"block": 3, "halo": 1, "width": 7}, 50, 50),
    ("CS", {"block": 5, "halo": 2}, 20, 33), ("NS", {"block": 5, "halo": 2}, 20, 33),
])
def test_forward_matches_reference(pattern, hparams, lq, lk):
    attn = create_attention("halo", pattern, 4, 8, **hparams)
    assert_block_layout_matches_reference(attn, lq, lk)


@pytest.mark.parametrize("pattern", ["NS", "CS"])
def test_regions_match_a_direct_construction(pattern):
    """2-D: query (r, c) in block (r // b, c // b) sees the keys of rows [R b - h, R b + b - 1 + h] and columns
    [C b - h, C b + b - 1 + h] that exist (CS: with r' <= r and c' <= c)."""
    b, h, width, length = 3, 1, 7, 40
    mask = create_attention("halo", pattern, 1, 4, block=b, halo=h, width=width).visible_mask(length, length)[0, 0]
    for i in range(length):
        r, c = divmod(i, width)
        rows = range((r // b) * b - h, (r // b) * b + b + h)
        cols = range((c // b) * b - h, (c // b) * b + b + h)
        expected = {rr * width + cc for rr in rows for cc in cols if 0 <= cc < width and 0 <= rr * width + cc < length
                    and (pattern == "NS" or (rr <= r and cc <= c))}
        assert set(torch.nonzero(mask[i]).flatten().tolist()) == expected, i


def test_zero_halo_is_block_diagonal_attention():
    mask = create_attention("halo", "NS", 1, 4, block=5, halo=0).visible_mask(23, 23)[0, 0]
    blocks = torch.arange(23) // 5
    assert torch.equal(mask, blocks[:, None] == blocks[None, :])


def test_flex_backend_matches_torch():
    flex = create_attention("halo", "CS", 2, 8, block=4, halo=2, backend="flex")
    eager = create_attention("halo", "CS", 2, 8, block=4, halo=2)
    q, k, v = (t.detach() for t in random_qkv(2, 2, 2, 30, 30, 8))
    torch.testing.assert_close(flex(q, k, v, holey_padding(30)), eager(q, k, v, holey_padding(30)),
                               rtol=1e-10, atol=1e-12)
