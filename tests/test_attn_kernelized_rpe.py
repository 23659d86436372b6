"""kernelized_rpe: FFT forward vs the dense reference (outputs and gradients, learned biases beyond the clip
included), the FFT Toeplitz product vs an explicit matrix, reduction to Performer at zero bias, decoding
across the clipping distance, conformance."""

import pytest
import torch

from cab import UnsupportedPattern, create_attention
from cab.attention._linear2_util import toeplitz_products
from cab.check import run_conformance
from cab.status import Status
from attn_helpers import assert_forward_matches_reference, holey_padding, random_qkv


def _random_bias(attn, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        attn.bias.copy_(torch.randn(attn.bias.shape, generator=gen, dtype=torch.float64))
    return attn


@pytest.mark.parametrize("pattern,lq,lk", [("NS", 37, 37), ("NS", 9, 14), ("CS", 70, 70), ("CS", 5, 12), ("CS", 12, 5)])
def test_forward_matches_reference_with_gradients(pattern, lq, lk):
    attn = _random_bias(create_attention("kernelized_rpe", pattern, 4, 8, num_features=12, max_distance=6, seed=1))
    attn.double()
    q, k, v = random_qkv(2, 4, 2, lq, lk, 8)
    assert_forward_matches_reference(attn, q, k, v, holey_padding(lk))


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


def test_cross_patterns_are_refused():
    for pattern in ("NC", "CC"):
        with pytest.raises(UnsupportedPattern, match="position"):
            create_attention("kernelized_rpe", pattern, 2, 8)


def test_decode_matches_forward_across_the_clip():
    attn = _random_bias(create_attention("kernelized_rpe", "CS", 4, 8, num_features=8, max_distance=5, seed=2), 3)
    attn.double()
    q, k, v = (t.detach() for t in random_qkv(2, 4, 2, 30, 30, 8))
    pad = torch.zeros(2, 30, dtype=torch.bool)
    pad[1, :2] = True
    for prefill in (0, 4, 13):
        mask = pad if prefill >= 2 else torch.zeros_like(pad)
        full = attn(q, k, v, mask)
        state = attn.decode_init(k[:, :, :prefill], v[:, :, :prefill], mask[:, :prefill])
        size = attn.decode_state_bytes(state)
        for t in range(prefill, 30):
            step = (q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1])
            out, _ = attn.decode_step(state, *step)
            again, state = attn.decode_step(state, *step)
            torch.testing.assert_close(out[:, :, 0], full[:, :, t], rtol=1e-9, atol=1e-11)
            torch.testing.assert_close(again, out, rtol=0, atol=0)
        assert attn.decode_state_bytes(state) == size


def test_float32_close_to_float64():
    attn = create_attention("kernelized_rpe", "CS", 2, 16)
    q, k, v = (t.detach() for t in random_qkv(1, 2, 2, 200, 200, 16))
    out64 = attn.double()(q, k, v)
    out32 = attn.float()(q.float(), k.float(), v.float())
    torch.testing.assert_close(out32.double(), out64, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("pattern", ["NS", "CS"])
def test_conformance(pattern):
    report = run_conformance("kernelized_rpe", pattern)
    assert report.status is Status.OK, report.message
