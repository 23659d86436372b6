"""The composable mask_mods of cab.attention.engine.masks against cab.patterns' dense masks."""

import pytest
import torch

from cab.attention.engine.masks import (
    aligned,
    and_masks,
    causal_mask,
    key_prefix,
    or_masks,
    padding_mask,
    same_segment,
    sliding_window,
)
from cab.patterns import Pattern, attention_mask, segment_mask, segment_runs


def dense(mask_fn, batch: int, lq: int, lk: int) -> torch.Tensor:
    b = torch.arange(batch)[:, None, None, None]
    i = torch.arange(lq)[None, None, :, None]
    j = torch.arange(lk)[None, None, None, :]
    return mask_fn(b, torch.zeros(1, 1, 1, 1, dtype=torch.long), i, j).expand(batch, 1, lq, lk)


@pytest.mark.parametrize("lq,lk", [(6, 6), (4, 9), (9, 4)])
def test_causal_and_padding_compose_to_the_pattern_mask(lq, lk):
    pad = torch.zeros(2, lk, dtype=torch.bool)
    pad[1, -2:] = True
    got = dense(and_masks(causal_mask(lq, lk), padding_mask(pad)), 2, lq, lk)
    assert torch.equal(got, attention_mask(Pattern.CS, lq, lk, pad).expand(2, 1, lq, lk))


def test_aligned_window_with_sinks_is_the_causal_band():
    lq, lk, w, s = 5, 12, 2, 1
    got = dense(aligned(Pattern.CS, lq, lk, or_masks(sliding_window(w), key_prefix(s))), 1, lq, lk)[0, 0]
    p = torch.arange(lq)[:, None] + lk - lq
    j = torch.arange(lk)[None, :]
    assert torch.equal(got, (j <= p) & ((p - j <= w) | (j < s)))
    assert torch.equal(dense(aligned(Pattern.NS, 6, 6, sliding_window(w)), 1, 6, 6)[0, 0],
                       (torch.arange(6)[:, None] - torch.arange(6)[None, :]).abs() <= w)


def test_same_segment_is_the_segment_mask():
    ids = torch.tensor([[0, 0, 1, 1, 1, 0], [2, 2, 2, 3, 3, 3]])
    got = dense(same_segment(segment_runs(ids)), 2, 6, 6)
    assert torch.equal(got, segment_mask(ids))
