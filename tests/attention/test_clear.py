"""clear (CLEAR, M34): forward vs the dense-mask reference (outputs, gradients, padding, GQA), the circular
window against a direct construction (and its symmetry: a convolution-like receptive field), conformance."""

import pytest
import torch

from cab import create_attention
from tests.attn_helpers import assert_block_layout_matches_reference


@pytest.mark.parametrize("pattern,hparams,lq,lk", [
    ("NS", {"radius": 2, "width": 8}, 45, 45), ("CS", {"radius": 2, "width": 7}, 50, 50),
    ("NS", {"radius": 3, "width": 0}, 37, 37), ("CS", {"radius": 3, "width": 6}, 20, 33),
])
def test_forward_matches_reference(pattern, hparams, lq, lk):
    attn = create_attention("clear", pattern, 4, 8, **hparams)
    assert_block_layout_matches_reference(attn, lq, lk)


@pytest.mark.parametrize("pattern", ["NS", "CS"])
def test_circle_matches_a_direct_construction(pattern):
    radius, width, length = 2, 9, 60
    mask = create_attention("clear", pattern, 1, 4, radius=radius, width=width).visible_mask(length, length)[0, 0]
    for i in range(length):
        r, c = divmod(i, width)
        expected = {j for j in range(length) if (j // width - r) ** 2 + (j % width - c) ** 2 <= radius ** 2
                    and (pattern == "NS" or j <= i)}
        assert set(torch.nonzero(mask[i]).flatten().tolist()) == expected, i
    if pattern == "NS":  # a symmetric, translation-invariant receptive field: 13 cells of radius 2 inside
        assert torch.equal(mask, mask.T)
        assert int(mask[4 * width + 4].sum()) == 13
