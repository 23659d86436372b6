"""top_theta: forward vs its row-by-row reference for each compensation (outputs and gradients), the
limits (nothing pruned = exact attention, everything pruned = the V mean under vmc), calibration to a
target count, pair counts, conformance."""

import pytest
import torch

from tests.attn_helpers import assert_forward_matches_reference, holey_padding, random_qkv
from cab import create_attention
from cab.patterns import Pattern, attention_mask


@pytest.mark.parametrize("compensation", ["none", "sdc", "vmc"])
@pytest.mark.parametrize("pattern,lq,lk", [("NS", 23, 23), ("CS", 19, 27), ("CS", 27, 19), ("NC", 27, 19), ("CC", 19, 27)])
def test_forward_matches_reference_with_gradients(pattern, lq, lk, compensation):
    attn = create_attention("top_theta", pattern, 4, 8, theta=0.5, compensation=compensation)
    q, k, v = random_qkv(2, 4, 2, lq, lk, 8)
    assert_forward_matches_reference(attn, q, k, v, holey_padding(lk))


@pytest.mark.parametrize("pattern", ["NS", "CS", "CC"])
def test_limits(pattern):
    lq, lk = (30, 23) if pattern == "CC" else (30, 30)
    q, k, v = (t.detach() for t in random_qkv(2, 2, 2, lq, lk, 8))
    pad = holey_padding(lk)
    mask = attention_mask(pattern, lq, lk, pad)
    exact = torch.softmax((q @ k.transpose(-1, -2) / 8 ** 0.5).masked_fill(~mask, float("-inf")), -1) @ v
    for comp in ("none", "sdc", "vmc"):
        torch.testing.assert_close(create_attention("top_theta", pattern, 2, 8, theta=-1e9, compensation=comp)(q, k, v, pad), exact)
    mean = (mask.double() @ v) / mask.sum(-1, keepdim=True).clamp_min(1)
    torch.testing.assert_close(create_attention("top_theta", pattern, 2, 8, theta=1e9)(q, k, v, pad), mean)


def test_calibration_keeps_about_the_target_per_row():
    attn = create_attention("top_theta", "NS", 2, 8, calibrate_k=8)
    q, k, v = (t.detach() for t in random_qkv(2, 2, 2, 80, 80, 8, seed=1))
    attn.calibrate(q, k)
    kept = attn.kept_pairs(q, k, v) / (2 * 2 * 80)
    assert 6 <= kept <= 10, kept
    assert attn.computed_pairs(q, k, v) == 2 * 2 * 80 * 80


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("pattern", ["NS", "CS", "NC", "CC"])
def test_padding_rows_without_keys_and_padded_gradients(pattern, dtype):
    """Regression (conformance key_padding[float32], NS/CS): exp ran on unmasked scores and was masked afterwards,
    so a padded key's garbage score above the row max overflowed and 0 * inf = NaN reached dq and dk."""
    _assert_padding_safe(create_attention("top_theta", pattern, 4, 32), pattern, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pattern", ["NS", "CS", "NC", "CC"])
def test_large_logits_finite(pattern, dtype):
    """max |q.k| / sqrt(D) = 200: outputs and gradients stay finite (CS in float32 gave non-finite dq, dk)."""
    _assert_large_logits_finite(create_attention("top_theta", pattern, 4, 32), dtype)
