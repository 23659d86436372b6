"""kernelized_rpe: FFT forward vs the dense reference (outputs and gradients, learned biases beyond the clip
included), the FFT Toeplitz product vs an explicit matrix, reduction to Performer at zero bias, decoding
across the clipping distance, float32 accuracy and numerical causality (the FFT runs in float64),
conformance."""

import pytest
import torch

from cab import create_attention
from cab.attention.engine.convolution import toeplitz_products
from tests.attn_helpers import assert_decode_matches_forward, assert_reference_agrees, holey_padding, random_qkv


def _random_bias(attn, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        attn.bias.copy_(torch.randn(attn.bias.shape, generator=gen, dtype=torch.float64))
    return attn


@pytest.mark.parametrize("pattern,lq,lk", [("NS", 37, 37), ("NS", 9, 14), ("CS", 70, 70), ("CS", 5, 12), ("CS", 12, 5)])
def test_forward_matches_reference_with_gradients(pattern, lq, lk):
    attn = _random_bias(create_attention("kernelized_rpe", pattern, 4, 8, num_features=12, max_distance=6, seed=1))
    attn.double()
    assert_reference_agrees(attn, lq, lk)


def test_fft_toeplitz_product_matches_the_explicit_matrix():
    gen = torch.Generator().manual_seed(1)
    lq, lk = 7, 11
    kernel = torch.randn(2, lq + lk - 1, generator=gen, dtype=torch.float64)
    x = torch.randn(3, 2, lk, 5, generator=gen, dtype=torch.float64)
    i, j = torch.arange(lq)[:, None], torch.arange(lk)[None, :]
    matrix = kernel[:, i - j + lk - 1]  # (H, lq, lk)
    torch.testing.assert_close(toeplitz_products(x, kernel, lq), matrix @ x, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("pattern", ["NS", "CS"])
def test_zero_bias_is_performer(pattern):
    """With b = 0 the Toeplitz weights are all 1 (CS: the causal triangle) and the mechanism is Performer
    with the same random features."""
    attn = create_attention("kernelized_rpe", pattern, 2, 8, num_features=10, seed=4).double()
    with torch.no_grad():
        attn.bias.zero_()
    performer = create_attention("performer", pattern, 2, 8, num_features=10, seed=4).double()
    q, k, v = (t.detach() for t in random_qkv(2, 2, 2, 30, 30, 8))
    pad = holey_padding(30)
    torch.testing.assert_close(attn(q, k, v, pad), performer(q, k, v, pad), rtol=1e-9, atol=1e-11)


def test_decode_matches_forward_across_the_clip():
    attn = _random_bias(create_attention("kernelized_rpe", "CS", 4, 8, num_features=8, max_distance=5, seed=2), 3)
    attn.double()
    for start, end in assert_decode_matches_forward(attn, prefills=(0, 4, 13), repeat=True):
        assert end == start


def _relative(a, b):
    """max |a - b| over the output scale max |b| (how conformance measures)."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("pattern,length", [("CS", 48), ("CS", 200), ("NS", 200)])
def test_float32_matches_the_float64_reference(pattern, length):
    """float32 inputs: the forward (its FFT computed in float64) matches the float64 reference() to ~1e-7 of
    the output scale; a float32 FFT was off by ~1e-4 (its round-off is relative to the largest entry of the
    whole transform)."""
    attn = create_attention("kernelized_rpe", pattern, 4, 32)
    q, k, v = (t.detach() for t in random_qkv(2, 4, 4, length, length, 32, dtype=torch.float32, seed=2))
    pad = torch.zeros(2, length, dtype=torch.bool)
    pad[1, 9:19] = True
    out32 = attn(q, k, v, pad)
    assert out32.dtype == torch.float32
    ref = attn.double().reference(q.double(), k.double(), v.double(), pad)
    assert _relative(out32, ref) < 1e-6


def test_float32_is_numerically_causal_at_a_long_length():
    """CS in float32 at L = 1536: perturbing the queries, keys and values after row i moves no row <= i by
    more than 1e-5 of the output scale (a float32 FFT spread ~1e-3), and a right-padded element equals the
    same element alone."""
    length, gen = 1536, torch.Generator().manual_seed(7)
    attn = create_attention("kernelized_rpe", "CS", 2, 64)
    q, k, v = (torch.randn(1, 2, length, 64, generator=gen) for _ in range(3))
    with torch.no_grad():
        out = attn(q, k, v)
        for split in (517, 979, 1534):
            moved = [t.clone() for t in (q, k, v)]
            for t in moved:
                t[:, :, split + 1:] += torch.randn(t[:, :, split + 1:].shape, generator=gen)
            assert _relative(attn(*moved)[:, :, : split + 1], out[:, :, : split + 1]) < 1e-5, split
        real = length - 300
        pad = torch.zeros(1, length, dtype=torch.bool)
        pad[0, real:] = True
        garbage = [torch.where(pad[:, None, :, None], 10.0 * torch.randn(t.shape, generator=gen), t) for t in (q, k, v)]
        alone = attn(q[:, :, :real], k[:, :, :real], v[:, :, :real])
        assert _relative(attn(*garbage, pad)[:, :, :real], alone) < 1e-5
