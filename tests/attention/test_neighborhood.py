"""neighborhood (NA, M31) and gna (GNA, M32): forward vs the dense-mask reference (outputs, gradients, padding,
GQA, 1-D and 2-D, dilation, stride), the neighbourhoods against a direct per-query construction and the
papers' identities (k neighbours per query at every border; stride = kernel is blocked attention), block
lists covering the mask, the FlexAttention backend, padding-invariance of the border shift, conformance."""

import pytest
import torch

from cab import UnsupportedPattern, create_attention
from cab.attention.engine.blocksparse import check_layout_covers
from tests.attn_helpers import assert_reference_agrees, holey_padding, random_qkv


def _small(attn, block=8):
    attn.block_size = block  # several blocks at test lengths
    return attn


@pytest.mark.parametrize("name,pattern,hparams,lq,lk", [
    ("neighborhood", "NS", {"kernel_size": 7}, 37, 37),
    ("neighborhood", "CS", {"kernel_size": 5, "dilation": 2}, 41, 41),
    ("neighborhood", "NS", {"kernel_size": 3, "dilation": 2, "width": 8}, 45, 45),
    ("neighborhood", "CS", {"kernel_size": 3, "width": 7}, 50, 50),
    ("neighborhood", "CS", {"kernel_size": 5}, 20, 33),
    ("neighborhood", "NS", {"kernel_size": 5}, 20, 33),
    ("gna", "NS", {"kernel_size": 6, "stride": 3}, 40, 40),
    ("gna", "CS", {"kernel_size": 6, "stride": 3, "width": 6}, 40, 40),
    ("gna", "NS", {"kernel_size": 4, "stride": 2, "width": 9, "dilation": 2}, 61, 61),
])
def test_forward_matches_reference(name, pattern, hparams, lq, lk):
    attn = _small(create_attention(name, pattern, 4, 8, **hparams))
    assert_reference_agrees(attn, lq, lk)
    ext = attn.extent(2, lk, holey_padding(lk), "cpu")
    assert check_layout_covers(attn.layout(lq, lk, None, ext), attn.mask_fn(lq, lk, ext), 1, batch=2)


def _axis_neighbours(t, n, k, d, s, causal):
    """Direct per-query construction on one axis: the query's dilation group as a list, the stride group's
    leader, the k group members around it (shifted inside at the borders), or ending at it (causal)."""
    members = list(range(t % d, n, d))
    u = members.index(t)
    if causal:
        leader = (u // s) * s + s - 1
        return {m for m in members[max(0, leader - k + 1):leader + 1] if m <= t}
    leader = min((u // s) * s + s // 2, len(members) - 1)
    start = min(max(leader - k // 2, 0), max(len(members) - k, 0))
    return set(members[start:start + k])


@pytest.mark.parametrize("pattern", ["NS", "CS"])
@pytest.mark.parametrize("k,d,s,width", [(5, 1, 1, 0), (3, 2, 1, 0), (4, 1, 4, 0), (3, 1, 1, 6), (4, 2, 2, 5)])
def test_neighbourhoods_match_a_direct_construction(pattern, k, d, s, width):
    length = 30
    attn = create_attention("gna", pattern, 1, 4, kernel_size=k, dilation=d, stride=s, width=width)
    mask = attn.visible_mask(length, length)[0, 0]
    rows, cols = (1, length) if width == 0 else (-(-length // width), width)
    for i in range(length):
        if width == 0:
            expected = _axis_neighbours(i, length, k, d, s, pattern == "CS")
        else:
            r_set = _axis_neighbours(i // cols, rows, k, d, s, pattern == "CS")
            c_set = _axis_neighbours(i % cols, cols, k, d, s, pattern == "CS")
            expected = {r * cols + c for r in r_set for c in c_set if r * cols + c < length}
        assert set(torch.nonzero(mask[i]).flatten().tolist()) == expected, i


def test_paper_identities():
    """NA: every query keeps exactly k (k x k in 2-D) neighbours, borders included; GNA with stride = kernel on
    a divisible length is blocked attention: tile t attends exactly to tile t."""
    one_d = create_attention("neighborhood", "NS", 1, 4, kernel_size=7, dilation=3).visible_mask(60, 60)[0, 0]
    assert (one_d.sum(-1) == 7).all()
    two_d = create_attention("neighborhood", "NS", 1, 4, kernel_size=3, width=8).visible_mask(48, 48)[0, 0]
    assert (two_d.sum(-1) == 9).all()
    blocked = create_attention("gna", "NS", 1, 4, kernel_size=5, stride=5).visible_mask(40, 40)[0, 0]
    tiles = torch.arange(40) // 5
    assert torch.equal(blocked, tiles[:, None] == tiles[None, :])


def test_trailing_padding_does_not_move_the_border_window():
    """The grid ends at each element's last real key: padding keys onto the end changes nothing."""
    attn = _small(create_attention("neighborhood", "NS", 2, 8, kernel_size=5))
    q, k, v = (t.detach() for t in random_qkv(1, 2, 2, 20, 20, 8))
    alone = attn(q, k, v)
    padded = attn(q, torch.cat([k, 50 * torch.randn(1, 2, 6, 8, dtype=k.dtype)], 2),
                  torch.cat([v, 50 * torch.randn(1, 2, 6, 8, dtype=v.dtype)], 2),
                  torch.tensor([[False] * 20 + [True] * 6]))
    torch.testing.assert_close(padded, alone, rtol=1e-12, atol=1e-12)


def test_flex_backend_matches_torch():
    """float64 runs FlexAttention's unfused path (no compilation): the BlockMask and mask_mod are checked."""
    flex = create_attention("neighborhood", "NS", 4, 8, kernel_size=5, width=8, backend="flex")
    eager = create_attention("neighborhood", "NS", 4, 8, kernel_size=5, width=8)
    q, k, v = random_qkv(2, 4, 2, 45, 45, 8)
    pad = holey_padding(45)
    out, ref = flex(q, k, v, pad), eager(q, k, v, pad)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(ref.sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_counts():
    """computed pairs lie between the neighbourhood's pairs and the dense count; FLOPs undeclared (the block
    list follows the padding)."""
    attn = _small(create_attention("neighborhood", "CS", 2, 8, kernel_size=5))
    q, k, v = (t.detach() for t in random_qkv(2, 2, 2, 64, 64, 8))
    pairs = attn.computed_pairs(q, k, v)
    assert 2 * 2 * int(attn.visible_mask(64, 64).sum()) <= pairs < 2 * 2 * 64 * 65 // 2
    assert attn.algorithmic_flops(2, 64, 64, 2) is None


def test_invalid_hyperparameters_and_cross_patterns():
    with pytest.raises(ValueError, match="stride"):
        create_attention("gna", "NS", 2, 8, kernel_size=3, stride=4)
    for name in ("neighborhood", "gna"):
        for pattern in ("NC", "CC"):
            with pytest.raises(UnsupportedPattern, match="grid"):
                create_attention(name, pattern, 2, 8)
