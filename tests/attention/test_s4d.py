"""s4d: the FFT convolution vs the recurrent scan (its reference), the kernel formula, causality,
padding, and conformance."""

import pytest
import torch

from cab import UnsupportedPattern, create_attention
from cab.attention.s4d import ssm_kernel, ssm_modes


def _inputs(b, hq, hkv, lq, lk, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, hkv, lk, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, hkv, lk, d, generator=gen, dtype=torch.float64)
    return q, k, v.requires_grad_()


@pytest.mark.parametrize("pattern", ["NS", "CS"])
@pytest.mark.parametrize("init", ["inv", "lin"])
def test_fft_convolution_matches_recurrent_scan_with_gradients(pattern, init):
    torch.manual_seed(1)
    attn = create_attention("s4d", pattern, 4, 6, init=init).double()
    q, k, v = _inputs(2, 4, 2, 29, 33, 6)  # GQA and Lq < Lk (the last Lq positions)
    pad = torch.zeros(2, 33, dtype=torch.bool)
    pad[1, -4:] = True
    pad[1, 5] = True
    out, ref = attn(q, k, v, pad), attn.reference(q, k, v, pad)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    cot = torch.randn_like(out)
    wrt = [v, *attn.parameters()]
    for a, b in zip(torch.autograd.grad(out, wrt, cot), torch.autograd.grad(ref, wrt, cot)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_blockwise_kernel_matches_direct_vandermonde():
    torch.manual_seed(0)
    attn = create_attention("s4d", "CS", 2, 3, d_state=8).double()
    dt_a, c_prime = ssm_modes(attn.a_log_neg_real, attn.a_imag, attn.log_dt, attn.c[0], torch.float64)
    for length in (1, 7, 50):
        direct = 2 * (c_prime[:, :, None] * torch.exp(dt_a[:, :, None] * torch.arange(length))).sum(1).real
        torch.testing.assert_close(ssm_kernel(dt_a, c_prime, length), direct, rtol=1e-12, atol=1e-13)


def test_queries_and_keys_are_ignored_and_causal_rows_see_no_future():
    attn = create_attention("s4d", "CS", 2, 4).double()
    q, k, v = (t.detach() for t in _inputs(1, 2, 2, 20, 20, 4))
    out = attn(q, k, v)
    torch.testing.assert_close(attn(torch.randn_like(q), torch.randn_like(k), v), out)
    v2 = v.clone()
    v2[:, :, 12:] = torch.randn_like(v2[:, :, 12:])
    torch.testing.assert_close(attn(q, k, v2)[:, :, :12], out[:, :, :12])
    ns = create_attention("s4d", "NS", 2, 4).double()
    assert not torch.allclose(ns(q, k, v2)[:, :, :12], ns(q, k, v)[:, :, :12])  # bidirectional does see it


def test_appended_padding_changes_nothing():
    attn = create_attention("s4d", "NS", 2, 4).double()
    q, k, v = (t.detach() for t in _inputs(1, 2, 2, 30, 30, 4))
    extra = torch.randn(1, 2, 7, 4, dtype=torch.float64) * 100
    qp, kp, vp = (torch.cat([t, extra], dim=2) for t in (q, k, v))
    pad = torch.arange(37)[None] >= 30
    torch.testing.assert_close(attn(qp, kp, vp, pad)[:, :, :30], attn(q, k, v), rtol=1e-10, atol=1e-10)


def test_parameters_are_deterministic_under_manual_seed_and_cross_is_refused():
    torch.manual_seed(3)
    first = create_attention("s4d", "NS", 2, 4)
    torch.manual_seed(3)
    second = create_attention("s4d", "NS", 2, 4)
    for a, b in zip(first.parameters(), second.parameters()):
        assert torch.equal(a, b)
    for pattern in ("NC", "CC"):
        with pytest.raises(UnsupportedPattern, match="s4d"):
            create_attention("s4d", pattern, 2, 4)


@pytest.mark.parametrize("prefill", [0, 9])
def test_token_by_token_decoding_reproduces_forward(prefill):
    torch.manual_seed(2)
    attn = create_attention("s4d", "CS", 4, 5).double()
    q, k, v = (t.detach() for t in _inputs(2, 4, 2, 20, 20, 5))
    pad = torch.zeros(2, 20, dtype=torch.bool)
    pad[1, :2] = bool(prefill)  # padded context tokens can only come through decode_init
    full = attn(q, k, v, pad)
    state = attn.decode_init(k[:, :, :prefill], v[:, :, :prefill], pad[:, :prefill], capacity=20)
    for t in range(prefill, 20):
        out, state = attn.decode_step(state, q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1])
        torch.testing.assert_close(out[:, :, 0], full[:, :, t], rtol=1e-10, atol=1e-12)
    with pytest.raises(NotImplementedError, match="CS"):
        create_attention("s4d", "NS", 4, 5).decode_init(k, v)
