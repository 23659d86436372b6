"""rectified_spa: forward vs its row-by-row reference (outputs and gradients, with and without the
rectification), the two exact limits (every block critical; one-token blocks, where pooling is exact),
pair counts, unsupported causal patterns, conformance."""

import pytest
import torch

from tests.attn_helpers import assert_forward_matches_reference, holey_padding, random_qkv
from cab import create_attention
from cab.patterns import Pattern, attention_mask

SMALL = {"block_size": 8, "topk": 2}


@pytest.mark.parametrize("rectify", [True, False])
@pytest.mark.parametrize("pattern,lq,lk", [("NS", 23, 23), ("NC", 27, 19), ("NC", 19, 27)])
def test_forward_matches_reference_with_gradients(pattern, lq, lk, rectify):
    attn = create_attention("rectified_spa", pattern, 4, 8, block_size=4, topk=2, rectify=rectify)
    q, k, v = random_qkv(2, 4, 2, lq, lk, 8)
    assert_forward_matches_reference(attn, q, k, v, holey_padding(lk))


@pytest.mark.parametrize("pattern", ["NS", "NC"])
def test_exact_limits(pattern):
    lq, lk = (30, 23) if pattern == "NC" else (30, 30)
    q, k, v = (t.detach() for t in random_qkv(2, 2, 2, lq, lk, 8))
    pad = holey_padding(lk)
    mask = attention_mask(pattern, lq, lk, pad)
    exact = torch.softmax((q @ k.transpose(-1, -2) / 8 ** 0.5).masked_fill(~mask, float("-inf")), -1) @ v
    every = create_attention("rectified_spa", pattern, 2, 8, block_size=4, topk=8)
    torch.testing.assert_close(every(q, k, v, pad), exact)
    assert every.computed_pairs(q, k, v, pad) == int(mask.expand(2, 2, lq, lk).sum())
    # one-token blocks: pooled attention is exact attention, so critical + rectified = exact for any topk
    # (padded self queries are left out of the query pool, so their rows differ; they are don't-care rows)
    tokens = create_attention("rectified_spa", pattern, 2, 8, block_size=1, topk=3)
    rows = torch.ones(2, lq, dtype=torch.bool) if pattern == "NC" else ~pad
    torch.testing.assert_close(tokens(q, k, v, pad)[rows[:, None].expand(2, 2, lq)], exact[rows[:, None].expand(2, 2, lq)])
    assert tokens.computed_pairs(q, k, v, pad) == 2 * 2 * lq * 3


def _padded_garbage_inputs(pattern, dtype, seed=0):
    """B=3, H=4, L=48, D=32 keys with left (element 0: keys 0..7), interior (element 1: keys 9..18) and full
    (element 2) padding; padded keys and values (and the queries at padded positions of self patterns) hold
    N(0, 10^2) garbage, so masked scores run far outside float32's exp range."""
    gen = torch.Generator().manual_seed(seed)
    b, h, length, d = 3, 4, 48, 32
    pad = torch.zeros(b, length, dtype=torch.bool)
    pad[0, :8], pad[1, 9:19], pad[2] = True, True, True
    q, k, v = (torch.randn(b, h, length, d, generator=gen, dtype=torch.float64) for _ in range(3))
    garbage = lambda t: torch.where(pad[:, None, :, None], 10 * torch.randn(t.shape, generator=gen, dtype=t.dtype), t)  # noqa: E731
    k, v = garbage(k), garbage(v)
    if not Pattern.parse(pattern).cross:
        q = garbage(q)
    return [t.to(dtype).requires_grad_() for t in (q, k, v)], pad


def _large_logit_inputs(dtype, seed=3, logit=200.0):
    """q, k, v (2, 4, 48, 32) with q and k scaled so that max |q.k| / sqrt(D) = logit."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 4, 48, 32, generator=gen, dtype=torch.float64) for _ in range(3))
    scale = (logit / ((q @ k.transpose(-1, -2)).abs().max() / 32 ** 0.5)).sqrt()
    return [t.to(dtype).requires_grad_() for t in (q * scale, k * scale, v)]


def _assert_padding_safe(attn, pattern, dtype):
    (q, k, v), pad = _padded_garbage_inputs(pattern, dtype)
    out = attn(q, k, v, pad)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype))
    assert torch.isfinite(out).all()
    blind = ~attention_mask(pattern, q.shape[-2], k.shape[-2], pad).any(-1)  # (B, 1, Lq): rows that see no key
    assert blind.any()
    assert (out.detach() * blind[..., None] == 0).all(), "rows that see no key must output exact zeros"
    for name, t in zip("qkv", (q, k, v)):
        assert torch.isfinite(t.grad).all(), f"non-finite d{name}"
    padded = pad[:, None, :, None].expand_as(k.grad)
    assert (k.grad[padded] == 0).all() and (v.grad[padded] == 0).all(), "gradient reached a padded key or value"


def _assert_large_logits_finite(attn, dtype):
    q, k, v = _large_logit_inputs(dtype)
    out = attn(q, k, v)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype))
    assert torch.isfinite(out).all()
    for name, t in zip("qkv", (q, k, v)):
        assert torch.isfinite(t.grad).all(), f"non-finite d{name} at |logit| 200 in {dtype}"


@pytest.mark.parametrize("hparams", [{}, SMALL])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("pattern", ["NS", "NC"])
def test_padding_rows_without_keys_and_padded_gradients(pattern, dtype, hparams):
    """Regression (conformance key_padding, NS/NC): a batch element whose keys are all padded has no key block, so
    every pooled logit of its rows was -inf and the block softmax gave NaN outputs and gradients."""
    _assert_padding_safe(create_attention("rectified_spa", pattern, 4, 32, **hparams), pattern, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pattern", ["NS", "NC"])
def test_large_logits_finite(pattern, dtype):
    """max |q.k| / sqrt(D) = 200: outputs and gradients stay finite (CS in float32 gave non-finite dq, dk)."""
    _assert_large_logits_finite(create_attention("rectified_spa", pattern, 4, 32), dtype)
