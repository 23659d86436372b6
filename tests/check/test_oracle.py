"""The float64 oracle and the eager baseline against closed forms and PyTorch's own kernel; NaN poisoning;
the comparison helpers of conformance."""

import math

import pytest
import torch
import torch.nn.functional as F

from cab.check.compare import oracle_allowance, relative_error
from cab.check.oracle import eager_attention, oracle_attention
from cab.check.poison import PoisonEmpty


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_uniform_scores_give_the_mean_of_the_visible_values():
    v = _randn(1, 2, 6, 3)
    q, k = torch.zeros(1, 2, 6, 4, dtype=torch.float64), _randn(1, 2, 6, 4, seed=1)
    for pattern in ("NS", "NC", "CC"):
        expected = v.mean(dim=2, keepdim=True).expand(1, 2, 6, 3)
        torch.testing.assert_close(oracle_attention(q, k, v, pattern), expected, rtol=0, atol=1e-14)
    causal = oracle_attention(q, k, v, "CS")
    for i in range(6):
        torch.testing.assert_close(causal[:, :, i], v[:, :, : i + 1].mean(dim=2), rtol=0, atol=1e-14)


def test_causal_self_is_bottom_right_aligned_and_empty_rows_are_zero():
    # 3 queries over 5 keys: query i sees keys j <= i + 2
    v = _randn(1, 1, 5, 2)
    out = oracle_attention(torch.zeros(1, 1, 3, 4, dtype=torch.float64), _randn(1, 1, 5, 4), v, "CS")
    for i in range(3):
        torch.testing.assert_close(out[0, 0, i], v[0, 0, : i + 3].mean(dim=0), rtol=0, atol=1e-14)
    # 5 queries over 3 keys: queries 0 and 1 see no key at all
    out = oracle_attention(torch.zeros(1, 1, 5, 4, dtype=torch.float64), _randn(1, 1, 3, 4), v[:, :, :3], "CS")
    assert torch.equal(out[0, 0, :2], torch.zeros(2, 2, dtype=torch.float64))
    torch.testing.assert_close(out[0, 0, 4], v[0, 0, :3].mean(dim=0), rtol=0, atol=1e-14)


def test_one_dominant_key_returns_its_value():
    d = 4
    k = torch.zeros(1, 1, 7, d, dtype=torch.float64)
    k[0, 0, 3, 0] = 200.0  # score 200 / sqrt(4) = 100 against 0 for every other key
    q = torch.zeros(1, 1, 2, d, dtype=torch.float64)
    q[..., 0] = 1.0
    v = _randn(1, 1, 7, 5)
    out = oracle_attention(q, k, v, "NC")
    torch.testing.assert_close(out[0, 0], v[0, 0, 3].expand(2, 5), rtol=0, atol=1e-15)


def test_key_padding_excludes_keys_and_fully_padded_rows_are_zero():
    v = _randn(2, 1, 6, 3)
    q, k = torch.zeros(2, 1, 4, 4, dtype=torch.float64), _randn(2, 1, 6, 4)
    padding = torch.tensor([[False] * 4 + [True] * 2, [True] * 6])
    out = oracle_attention(q, k, v, "NC", key_padding_mask=padding)
    torch.testing.assert_close(out[0, 0], v[0, 0, :4].mean(dim=0).expand(4, 3), rtol=0, atol=1e-14)
    assert torch.equal(out[1], torch.zeros(1, 4, 3, dtype=torch.float64))


def test_grouped_query_heads_share_key_value_heads_in_order():
    q, k, v = _randn(1, 4, 5, 8), _randn(1, 2, 5, 8, seed=1), _randn(1, 2, 5, 8, seed=2)
    grouped = oracle_attention(q, k, v, "NS")
    expanded = oracle_attention(q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1), "NS")
    torch.testing.assert_close(grouped, expanded, rtol=0, atol=0)
    # query heads 0 and 1 use key/value head 0
    torch.testing.assert_close(grouped[:, :2], oracle_attention(q[:, :2], k[:, :1], v[:, :1], "NS"), rtol=0, atol=0)


@pytest.mark.parametrize("pattern", ["NS", "CS", "NC", "CC"])
def test_oracle_matches_pytorch_sdpa_in_float64(pattern):
    lq, lk = (9, 13) if pattern in ("NC", "CC") else (11, 11)
    q, k, v = _randn(2, 3, lq, 8), _randn(2, 3, lk, 8, seed=1), _randn(2, 3, lk, 8, seed=2)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=pattern == "CS")
    torch.testing.assert_close(oracle_attention(q, k, v, pattern), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("pattern", ["NS", "CS", "NC", "CC"])
def test_eager_baseline_matches_the_oracle_with_padding_and_gqa(pattern):
    lq, lk = (5, 8) if pattern in ("NC", "CC") else (8, 8)
    q, k, v = _randn(2, 4, lq, 6), _randn(2, 2, lk, 6, seed=1), _randn(2, 2, lk, 6, seed=2)
    padding = torch.zeros(2, lk, dtype=torch.bool)
    padding[1, -3:] = True
    torch.testing.assert_close(eager_attention(q, k, v, pattern, padding), oracle_attention(q, k, v, pattern, padding),
                               rtol=1e-12, atol=1e-12)


def test_oracle_gradients_match_finite_differences():
    q = _randn(1, 2, 4, 3).requires_grad_()
    k = _randn(1, 1, 5, 3, seed=1).requires_grad_()
    v = _randn(1, 1, 5, 3, seed=2).requires_grad_()
    padding = torch.tensor([[False, False, False, True, False]])
    assert torch.autograd.gradcheck(lambda a, b, c: oracle_attention(a, b, c, "CS", padding), (q, k, v))


def test_oracle_returns_float64_for_lower_precision_inputs():
    q = _randn(1, 1, 3, 4).float()
    assert oracle_attention(q, q, q, "NS").dtype == torch.float64


def test_poison_fills_every_floating_empty_allocation_with_nan():
    x = torch.ones(3)
    with PoisonEmpty():
        made = [torch.empty(3), torch.empty_like(x), x.new_empty(2), torch.empty_strided((2, 2), (2, 1)),
                x.new_empty_strided((2,), (1,)), torch.empty(2, dtype=torch.complex64)]
        zeros, integers = torch.zeros(3), torch.empty(4, dtype=torch.int64)
        written = torch.empty(3).fill_(1.0)
    assert all(bool(torch.isnan(t).all()) for t in made)
    assert torch.equal(zeros, torch.zeros(3)) and integers.dtype == torch.int64
    assert torch.equal(written, torch.ones(3))
    with PoisonEmpty():
        y = torch.randn(4, requires_grad=True)
        (y[:2] * 2).sum().backward()  # autograd's own buffers are fully written: gradients stay finite
    assert torch.equal(y.grad, torch.tensor([2.0, 2.0, 0.0, 0.0]))


def test_relative_error_is_relative_to_the_expected_scale_and_infinite_for_nan():
    expected = torch.tensor([2.0, -4.0])
    assert relative_error(torch.tensor([2.0, -3.0]), expected) == pytest.approx(0.25)
    assert relative_error(torch.tensor([float("nan"), -4.0]), expected) == math.inf
    with pytest.raises(ValueError, match="cannot compare shapes"):
        relative_error(torch.zeros(3), expected)


def test_oracle_allowance_is_twice_eager_plus_a_few_ulps_of_the_scale():
    assert oracle_allowance(1e-6, 2.0, torch.float32) == pytest.approx(2e-6 + 16 * 2.0 ** -23 * 2.0)
    assert oracle_allowance(1e-2, 4.0, torch.bfloat16) == pytest.approx(2e-2 + 4 * 2.0 ** -7 * 4.0)
