"""dense_flops against hand-computed closed forms and against torch's FlopCounterMode on eager attention."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from cab.bench import dense_flops
from cab.registry import create_attention

B, H, DK, DV = 2, 3, 16, 8


def fwd_closed(pairs_per_head: int) -> int:
    return 2 * pairs_per_head * (DK + DV)


def bwd_closed(pairs_per_head: int) -> int:
    return 2 * pairs_per_head * (3 * DK + 2 * DV)


# (pattern, lq, lk, visible pairs of one (batch, head), written out by hand)
CASES = [
    ("NS", 8, 8, 64),
    ("CS", 8, 8, 8 * 9 // 2),  # 1 + 2 + ... + 8
    ("CS", 3, 8, 6 + 7 + 8),  # bottom-right aligned: the 3 queries are the last 3 positions
    ("NC", 5, 12, 60),
    ("CC", 5, 12, 60),  # query-side causality hides no key
]


@pytest.mark.parametrize("pattern,lq,lk,pairs", CASES)
def test_every_mode_matches_the_closed_form(pattern, lq, lk, pairs):
    total = B * H * pairs
    expected = {"fwd": fwd_closed(total), "fwd_infer": fwd_closed(total), "bwd": bwd_closed(total),
                "fwdbwd": fwd_closed(total) + bwd_closed(total)}
    for mode, value in expected.items():
        assert dense_flops(pattern, B, H, lq, lk, DK, DV, mode) == value, mode


def test_backward_is_two_and_a_half_forwards_when_dk_equals_dv():
    fwd = dense_flops("NS", 1, 1, 64, 64, 32, 32, "fwd")
    assert dense_flops("NS", 1, 1, 64, 64, 32, 32, "bwd") * 2 == 5 * fwd


def test_padding_counts_each_row_exactly():
    # batch 0 pads key 3, batch 1 pads key 0; L = 4
    mask = torch.tensor([[False, False, False, True], [True, False, False, False]])
    # NS: every query sees the 3 real keys of its batch element -> 4 * 3 per batch element
    assert dense_flops("NS", 2, H, 4, 4, DK, DV, "fwd", key_padding_mask=mask) == fwd_closed(H * (12 + 12))
    # CS: batch 0 rows see 1, 2, 3, 3 keys; batch 1 rows see 0, 1, 2, 3 keys
    assert dense_flops("CS", 2, H, 4, 4, DK, DV, "bwd", key_padding_mask=mask) == bwd_closed(H * (9 + 6))


def test_flash_convention_counts_causal_self_as_half_the_square():
    assert dense_flops("CS", B, H, 8, 8, DK, DV, "fwd", convention="flash") == fwd_closed(B * H * 32)
    assert dense_flops("NS", B, H, 8, 8, DK, DV, "fwd", convention="flash") == fwd_closed(B * H * 64)
    assert dense_flops("CS", B, H, 8, 8, DK, DV, "fwd") == fwd_closed(B * H * 36)


@pytest.mark.parametrize("pattern,lq,lk", [("NS", 16, 16), ("NC", 8, 24)])
def test_matches_torch_flop_counter_on_eager_attention(pattern, lq, lk):
    """FlopCounterMode counts the two forward matmuls, and in backward dQ, dK, dP and dV but no
    recompute of QK^T, which the dense convention (FlashAttention's) adds: 2 * pairs * Dk."""
    attn = create_attention("vanilla", pattern, H, DK)
    q = torch.randn(B, H, lq, DK, requires_grad=True)
    k = torch.randn(B, H, lk, DK, requires_grad=True)
    v = torch.randn(B, H, lk, DK, requires_grad=True)
    with FlopCounterMode(display=False) as forward_counter:
        out = attn(q, k, v)
    with FlopCounterMode(display=False) as backward_counter:
        out.backward(torch.ones_like(out))
    pairs = B * H * lq * lk
    assert forward_counter.get_total_flops() == dense_flops(pattern, B, H, lq, lk, DK, DK, "fwd")
    assert backward_counter.get_total_flops() == dense_flops(pattern, B, H, lq, lk, DK, DK, "bwd") - 2 * pairs * DK


def test_rejects_unknown_mode_and_mismatched_padding():
    with pytest.raises(ValueError, match="mode"):
        dense_flops("NS", 1, 1, 4, 4, 8, 8, "forward")
    with pytest.raises(ValueError, match="batch"):
        dense_flops("NS", 3, 1, 4, 4, 8, 8, "fwd", key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
