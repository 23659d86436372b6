"""probsparse: forward vs its explicit per-query loop, the hashed sampler, the prefix ranking, padding,
causality and conformance."""

import math

import pytest
import torch

from cab import create_attention
from cab.attention.engine.routing import sample_ranks
from cab.attention.probsparse import log_budget, prefix_rank
from tests.attn_helpers import assert_appended_padding_changes_nothing, random_qkv


def _lazy_rows(attn, q, k, v, pad):
    """Rows whose output equals the (cumulative, for CS) mean of the visible values: the lazy rows."""
    out = attn(q, k, v, pad).detach()
    real = ~pad
    vv = v.detach().repeat_interleave(q.shape[1] // v.shape[1], dim=1) * real[:, None, :, None]
    lq, lk = q.shape[-2], k.shape[-2]
    if attn.pattern.value == "CS":
        pos = torch.arange(lq) + lk - lq
        mean = vv.cumsum(2)[:, :, pos] / real.cumsum(1)[:, pos].clamp_min(1)[:, None, :, None]
    else:
        mean = vv.sum(2, keepdim=True) / real.sum(1).clamp_min(1)[:, None, None, None]
    return torch.isclose(out, mean.expand_as(out), rtol=1e-12, atol=1e-12).all(-1)


@pytest.mark.parametrize("pattern,lq,lk", [
    ("NS", 48, 48), ("CS", 48, 48), ("CS", 37, 53), ("NC", 41, 29), ("CC", 41, 29), ("CC", 29, 41),
])
def test_forward_matches_per_query_loop_with_gradients(pattern, lq, lk):
    attn = create_attention("probsparse", pattern, 4, 8, factor=2, seed=7)
    q, k, v = random_qkv(2, 4, 2, lq, lk, 8)
    pad = torch.zeros(2, lk, dtype=torch.bool)
    pad[1, -5:] = True
    pad[1, 2] = True
    lazy = _lazy_rows(attn, q, k, v, pad)
    assert lazy.any() and (~lazy).any(), "the case must have both active and lazy rows"
    out, ref = attn(q, k, v, pad), attn.reference(q, k, v, pad)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    cot = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), cot), torch.autograd.grad(ref, (q, k, v), cot)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_prefix_rank_counts_earlier_rows_at_least_as_large():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 2, 77, generator=gen)
    scores[0, 0, 10] = scores[0, 0, 3]  # a tie
    scores[1, 1, 20:30] = float("-inf")
    expected = torch.tensor([[[int((row[:i] >= row[i]).sum()) for i in range(77)] for row in rows] for rows in scores])
    assert torch.equal(prefix_rank(scores), expected)


def test_sampler_is_seeded_stable_and_roughly_uniform():
    rows = torch.arange(200)
    counts = torch.full((1, 200), 10)
    first = sample_ranks(3, rows, 40, counts)
    assert torch.equal(first, sample_ranks(3, rows, 40, counts))
    assert not torch.equal(first, sample_ranks(4, rows, 40, counts))
    assert int(first.min()) == 0 and int(first.max()) == 9
    assert torch.equal(sample_ranks(3, rows[:50], 40, counts[:, :50]), first[:, :50])  # prefix-stable
    assert torch.equal(sample_ranks(3, rows, 25, counts), first[..., :25])  # more samples extend, not reshuffle
    freq = torch.bincount(first.flatten(), minlength=10).double() / first.numel()
    assert (freq - 0.1).abs().max() < 0.02  # 6 standard deviations of 8000 draws


def test_budget_is_c_ceil_ln_n_capped():
    n = torch.tensor([1, 2, 7, 8, 100, 4096])
    expected = [min(int(x), 5 * math.ceil(math.log(int(x)))) for x in n]
    assert log_budget(5, n).tolist() == expected


@pytest.mark.parametrize("pattern", ["NS", "CS"])
def test_appended_padding_changes_nothing(pattern):
    attn = create_attention("probsparse", pattern, 2, 8, factor=3)
    q, k, v = (t.detach() for t in random_qkv(1, 2, 2, 60, 60, 8))
    assert_appended_padding_changes_nothing(attn, q, k, v, extra=11, rtol=1e-12, atol=1e-12)


def test_causal_rows_do_not_depend_on_later_rows():
    attn = create_attention("probsparse", "CS", 2, 8, factor=2)
    q, k, v = (t.detach() for t in random_qkv(1, 2, 2, 64, 64, 8))
    full = attn(q, k, v)
    for stop in (1, 9, 30, 63):
        torch.testing.assert_close(attn(q[:, :, :stop], k[:, :, :stop], v[:, :, :stop]), full[:, :, :stop])
