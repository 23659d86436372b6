"""s2_attn (LongLoRA S2-Attn) and sf_attn (SinkLoRA SF-Attn), M46: forward vs the dense-mask reference, the
per-head groups against LongLoRA's roll-and-chunk procedure, the causal repair of the wrap-around group,
the sinks, conformance."""

import pytest
import torch

from cab import create_attention
from tests.attn_helpers import assert_block_layout_matches_reference


@pytest.mark.parametrize("name,pattern,hparams,lq,lk", [
    ("s2_attn", "NS", {"group_size": 8}, 45, 45), ("s2_attn", "CS", {"group_size": 8}, 50, 50),
    ("s2_attn", "CS", {"group_size": 6}, 20, 33), ("s2_attn", "NS", {"group_size": 30}, 45, 45),
    ("sf_attn", "NS", {"group_size": 8}, 45, 45), ("sf_attn", "CS", {"group_size": 10, "sinks": 2}, 37, 37),
])
def test_forward_matches_reference(name, pattern, hparams, lq, lk):
    attn = create_attention(name, pattern, 4, 8, **hparams)
    assert_block_layout_matches_reference(attn, lq, lk, heads=4, batch=2)


def _longlora_groups(length, group, shifted, wrap):
    """LongLoRA's procedure: roll the positions by -G/2 (shifted heads), chunk into groups of G; without the
    wrap the rolled-in tail goes back to the start (SF-Attn's reassembly)."""
    positions = list(range(length))
    if shifted:
        half = group // 2
        if wrap:
            positions = positions[half:] + positions[:half]
        else:
            return [positions[:half]] + [positions[s:s + group] for s in range(half, length, group)]
    return [positions[s:s + group] for s in range(0, length, group)]


@pytest.mark.parametrize("name,pattern", [("s2_attn", "NS"), ("s2_attn", "CS"), ("sf_attn", "NS"), ("sf_attn", "CS")])
def test_groups_match_longlora_procedure(name, pattern):
    length, group, sinks = 40, 8, (2 if name == "sf_attn" else 0)
    attn = create_attention(name, pattern, 4, 4, group_size=group, sinks=sinks)
    mask = attn.visible_mask(length, length)[0]
    wrap = name == "s2_attn" and pattern == "NS"
    for h in range(4):
        groups = _longlora_groups(length, group, shifted=h >= 2, wrap=wrap)
        expected = torch.zeros(length, length, dtype=torch.bool)
        for members in groups:
            idx = torch.tensor(members)
            expected[idx[:, None], idx[None, :]] = True
        expected[:, :sinks] = True
        if pattern == "CS":
            expected &= torch.ones(length, length, dtype=torch.bool).tril()
        assert torch.equal(mask[h], expected), h


def test_the_causal_variant_does_not_wrap():
    """LongLoRA's rolled last group (last G/2 and first G/2 tokens) with its causal mask applied after the
    roll would let token 0 see tokens 36..39; cab's CS groups keep the first G/2 tokens apart."""
    mask = create_attention("s2_attn", "CS", 2, 4, group_size=8).visible_mask(40, 40)[0, 1]
    assert not bool(mask.triu(1).any())
    assert torch.equal(torch.nonzero(mask[3]).flatten(), torch.arange(4))


def test_defaults():
    s2 = create_attention("s2_attn", "CS", 4, 8)
    sf = create_attention("sf_attn", "CS", 4, 8)
    assert (s2.group_size, s2.sinks, sf.group_size, sf.sinks) == (2048, 0, 2048, 4)
