"""top_theta: forward vs its row-by-row reference for each compensation (outputs and gradients), the
limits (nothing pruned = exact attention, everything pruned = the V mean under vmc), calibration to a
target count, pair counts, conformance."""

import pytest
import torch

from cab import create_attention
from tests.attn_helpers import (
    assert_large_logits_finite,
    assert_padding_safe,
    assert_reference_agrees,
    exact_attention_case,
    random_qkv,
)


@pytest.mark.parametrize("compensation", ["none", "sdc", "vmc"])
@pytest.mark.parametrize(
    "pattern,lq,lk", [("NS", 23, 23), ("CS", 19, 27), ("CS", 27, 19), ("NC", 27, 19), ("CC", 19, 27)]
)
def test_forward_matches_reference_with_gradients(pattern, lq, lk, compensation):
    attn = create_attention("top_theta", pattern, 4, 8, theta=0.5, compensation=compensation)
    assert_reference_agrees(attn, lq, lk)


@pytest.mark.parametrize("pattern", ["NS", "CS", "CC"])
def test_limits(pattern):
    q, k, v, pad, mask, exact = exact_attention_case(pattern)
    for comp in ("none", "sdc", "vmc"):
        attn = create_attention("top_theta", pattern, 2, 8, theta=-1e9, compensation=comp)
        torch.testing.assert_close(attn(q, k, v, pad), exact)
    mean = (mask.double() @ v) / mask.sum(-1, keepdim=True).clamp_min(1)
    torch.testing.assert_close(create_attention("top_theta", pattern, 2, 8, theta=1e9)(q, k, v, pad), mean)


def test_calibration_keeps_about_the_target_per_row():
    attn = create_attention("top_theta", "NS", 2, 8, calibrate_k=8)
    q, k, v = (t.detach() for t in random_qkv(2, 2, 2, 80, 80, 8, seed=1))
    attn.calibrate(q, k)
    kept = attn.kept_pairs(q, k, v) / (2 * 2 * 80)
    assert 6 <= kept <= 10, kept
    assert attn.computed_pairs(q, k, v) == 2 * 2 * 80 * 80


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("pattern", ["NS", "CS", "NC", "CC"])
def test_padding_rows_without_keys_and_padded_gradients(pattern, dtype):
    """Regression (conformance key_padding[float32], NS/CS): exp ran on unmasked scores and was masked afterwards,
    so a padded key's garbage score above the row max overflowed and 0 * inf = NaN reached dq and dk."""
    assert_padding_safe(create_attention("top_theta", pattern, 4, 32), pattern, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pattern", ["NS", "CS", "NC", "CC"])
def test_large_logits_finite(pattern, dtype):
    """max |q.k| / sqrt(D) = 200: outputs and gradients stay finite (CS in float32 gave non-finite dq, dk)."""
    assert_large_logits_finite(create_attention("top_theta", pattern, 4, 32), dtype)
