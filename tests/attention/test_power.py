"""power (PowerAttention, M35): forward vs the dense-mask reference, the block pattern against a direct
construction (power-of-two block distances, local and sink blocks), the O(log L) blocks per query block,
the receptive field that stacking reaches, conformance."""

import pytest
import torch

from cab import create_attention
from tests.attn_helpers import assert_block_layout_matches_reference


@pytest.mark.parametrize("pattern,hparams,lq,lk", [
    ("NS", {"block": 4}, 45, 45), ("CS", {"block": 4}, 50, 50), ("CS", {"block": 3, "window": 0, "sinks": 2}, 20, 33),
    ("NS", {"block": 3, "window": 2, "sinks": 0}, 37, 37),
])
def test_forward_matches_reference(pattern, hparams, lq, lk):
    attn = create_attention("power", pattern, 4, 8, **hparams)
    assert_block_layout_matches_reference(attn, lq, lk)


@pytest.mark.parametrize("pattern", ["NS", "CS"])
def test_pattern_matches_a_direct_construction(pattern):
    block, window, sinks, length = 2, 1, 1, 70
    attn = create_attention("power", pattern, 1, 4, block=block, window=window, sinks=sinks)
    mask = attn.visible_mask(length, length)[0, 0]
    powers = {2 ** e for e in range(10)}
    for i in range(length):
        m = i // block
        expected = set()
        for j in range(length):
            d = m - j // block if pattern == "CS" else abs(m - j // block)
            if (d >= 0 and (d <= window or d in powers)) or j // block < sinks:
                if pattern == "NS" or j <= i:
                    expected.add(j)
        assert set(torch.nonzero(mask[i]).flatten().tolist()) == expected, i


def test_logarithmic_blocks_and_exponential_receptive_field():
    """A query block lists about log2(blocks) key blocks; d stacked layers of the causal pattern connect
    every token to every earlier one within 2^d blocks (the paper's complete, continuous receptive field)."""
    attn = create_attention("power", "CS", 1, 4, block=4, window=0, sinks=0)
    attn.block_size = 4
    layout = attn.layout(1024, 1024)
    assert int(layout.kv_num.max()) <= 1 + 9  # distance 0 and 1, 2, 4, ..., 128, 255 blocks in all -> 9 powers
    mask = attn.visible_mask(256, 256)[0, 0].to(torch.float64)
    reach = mask.clone()
    for _ in range(5):  # six layers
        reach = ((reach @ mask) > 0).to(torch.float64)
    blocks = torch.arange(256) // 4
    within = (blocks[:, None] - blocks[None, :] < 2 ** 6) & (torch.arange(256)[:, None] >= torch.arange(256)[None, :])
    assert bool((reach.bool() | ~within).all())
