"""delta: forward vs its row-by-row reference over two different bases (outputs and gradients), the
correction is exact at the anchor rows and gamma = 1 is exact attention, padded anchors,
causality, conformance."""

import pytest
import torch

from cab import create_attention
from cab.patterns import attention_mask
from tests.attn_helpers import assert_causal_prefixes_match, assert_forward_matches_reference, holey_padding, random_qkv

SMALL = {"gamma": 5, "base_hparams": {"window": 4, "sinks": 1}}


def _exact(q, k, v, pattern, pad):
    mask = attention_mask(pattern, q.shape[-2], k.shape[-2], pad)
    k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    return torch.softmax((q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).masked_fill(~mask, float("-inf")), -1) @ v


@pytest.mark.parametrize("pattern,lq,lk", [("NS", 23, 23), ("CS", 23, 23), ("CS", 19, 27), ("CS", 27, 19)])
@pytest.mark.parametrize("base,hp", [("local", {"window": 3, "sinks": 1}), ("biformer", {"region_size": 4, "topk": 2})])
def test_forward_matches_reference_with_gradients(pattern, lq, lk, base, hp):
    attn = create_attention("delta", pattern, 4, 8, base=base, base_hparams=hp, gamma=5)
    q, k, v = random_qkv(2, 4, 2, lq, lk, 8)
    pad = holey_padding(lk)
    pad[0, 5] = True  # a padded anchor row
    assert_forward_matches_reference(attn, q, k, v, pad)


@pytest.mark.parametrize("pattern", ["NS", "CS"])
def test_anchor_rows_are_exact_and_gamma_one_is_exact_attention(pattern):
    q, k, v = (t.detach() for t in random_qkv(2, 2, 2, 30, 30, 8))
    pad = holey_padding(30)
    exact = _exact(q, k, v, pattern, pad)
    attn = create_attention("delta", pattern, 2, 8, gamma=7, base_hparams={"window": 2, "sinks": 0})
    out = attn(q, k, v, pad)
    torch.testing.assert_close(out[:, :, 0:27:7], exact[:, :, 0:27:7])  # anchors 0..21; 28 is padded in b=1
    assert (out - exact).abs().max() > 1e-3  # the other rows are only corrected, not exact
    one = create_attention("delta", pattern, 2, 8, gamma=1, base_hparams={"window": 2, "sinks": 0})
    torch.testing.assert_close(one(q, k, v, pad)[:, :, 2:27], exact[:, :, 2:27])  # real rows


def test_computed_pairs_add_the_anchor_rows():
    q, k, v = (t.detach() for t in random_qkv(1, 2, 2, 40, 40, 8))
    base = create_attention("local", "CS", 2, 8, window=3, sinks=0)
    attn = create_attention("delta", "CS", 2, 8, gamma=10, base_hparams={"window": 3, "sinks": 0})
    anchors = sum(r + 1 for r in range(0, 40, 10))
    assert attn.computed_pairs(q, k, v) == base.computed_pairs(q, k, v) + 2 * anchors


def test_causal_rows_ignore_the_future():
    attn = create_attention("delta", "CS", 2, 8, **SMALL)
    assert_causal_prefixes_match(attn)
