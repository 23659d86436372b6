"""flash and flex: flash-attn's calling convention driven through stand-in kernels written from its
documented semantics (no GPU here), availability reasons, FlexAttention against eager attention (the
unfused float64 path and one compiled float32 case), the chunked CPU backward, and conformance."""

import pytest
import torch

from cab import create_attention
from cab.attention.flash import FlashAttention, exact_attention_backward, flash_forward
from cab.check import run_conformance
from cab.patterns import Pattern, attention_mask
from cab.status import Status
from attn_helpers import random_qkv

PATTERN_SHAPES = [("NS", 30, 30), ("CS", 30, 30), ("CS", 19, 30), ("CS", 30, 19), ("NC", 23, 31), ("CC", 31, 23)]


_inputs = random_qkv


def _padding(b, lk):
    pad = torch.zeros(b, lk, dtype=torch.bool)
    pad[1, -6:] = True
    pad[1, 2] = True
    if b > 2:
        pad[2] = True  # a batch row with no real key at all
    return pad


def _eager(q, k, v, pattern, pad):
    """Plain masked softmax attention (rows that see no key are zero), written here from the definition."""
    k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    keep = attention_mask(pattern, q.shape[-2], k.shape[-2], pad)
    scores = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).masked_fill(~keep, float("-inf"))
    any_key = keep.any(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~any_key, 0.0), dim=-1).masked_fill(~any_key, 0.0)
    return probs @ v


# stand-ins for flash-attn's kernels, from its documentation: tensors (B, L, H, D), k/v heads dividing q
# heads (query head h uses key head h // (Hq / Hkv)), causal mask aligned to the bottom-right corner
# (row i sees keys j <= i + Lk - Lq), a row that sees no key outputs 0; varlen packs sequences along dim 0.

def fake_flash_attn_func(q, k, v, causal=False):
    lq, lk, group = q.shape[1], k.shape[1], q.shape[2] // k.shape[2]
    out = torch.zeros_like(q)
    for h in range(q.shape[2]):
        scores = torch.einsum("bid,bjd->bij", q[:, :, h], k[:, :, h // group]) / q.shape[-1] ** 0.5
        if causal:
            allowed = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + lk - lq
            scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        out[:, :, h] = probs @ v[:, :, h // group]
    return out


def fake_flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=False):
    assert cu_q.dtype == cu_k.dtype == torch.int32
    pieces = []
    for s in range(len(cu_q) - 1):
        qs, ks = slice(int(cu_q[s]), int(cu_q[s + 1])), slice(int(cu_k[s]), int(cu_k[s + 1]))
        assert qs.stop - qs.start <= max_q and ks.stop - ks.start <= max_k
        if qs.stop > qs.start:
            pieces.append(fake_flash_attn_func(q[None, qs], k[None, ks], v[None, ks], causal)[0])
    return torch.cat(pieces)


@pytest.mark.parametrize("pattern,lq,lk", PATTERN_SHAPES)
@pytest.mark.parametrize("padded", [False, True])
def test_flash_calling_convention_gives_exact_attention(pattern, lq, lk, padded):
    q, k, v = _inputs(3, 4, 2, lq, lk, 8)
    pad = _padding(3, lk) if padded else None
    out = flash_forward(q, k, v, pad, pattern == "CS", fake_flash_attn_func, fake_flash_attn_varlen_func)
    expected = _eager(q, k, v, pattern, pad)
    rows = torch.ones(3, lq, dtype=torch.bool)
    if padded and pattern == "CS":  # padded query rows are packed out and come back as zeros
        position = torch.arange(lq) + lk - lq
        rows = (position < 0) | ~pad[:, position.clamp_min(0)]
        rows[2] = True
        assert out.detach().transpose(1, 2)[~rows].abs().max() == 0
    torch.testing.assert_close(out.transpose(1, 2)[rows], expected.transpose(1, 2)[rows])
    grads = torch.autograd.grad(out.transpose(1, 2)[rows].sum(), (q, k, v))
    expected_grads = torch.autograd.grad(expected.transpose(1, 2)[rows].sum(), (q, k, v))
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b)


def test_flash_is_unavailable_on_cpu_and_says_why():
    reason = FlashAttention.unavailable_reason("cpu")
    assert reason and "CUDA" in reason
    attn = create_attention("flash", "CS", 2, 8)
    q, k, v = (t.detach().float() for t in _inputs(1, 2, 2, 4, 4, 8))
    with pytest.raises(RuntimeError, match="CUDA"):
        attn(q, k, v)
    with pytest.raises(ValueError, match="compute_dtype"):
        create_attention("flash", "NS", 2, 8, compute_dtype="float32")
    assert run_conformance("flash", "NS").status is Status.UNSUPPORTED


@pytest.mark.parametrize("pattern,lq,lk", PATTERN_SHAPES)
def test_flex_float64_path_matches_eager_attention_with_gradients(pattern, lq, lk):
    attn = create_attention("flex", pattern, 4, 8)
    q, k, v = _inputs(3, 4, 2, lq, lk, 8)
    pad = _padding(3, lk)
    out, expected = attn(q, k, v, pad), _eager(q, k, v, pattern, pad)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    cot = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), cot), torch.autograd.grad(expected, (q, k, v), cot)):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("pattern,lq,lk", PATTERN_SHAPES)
def test_chunked_backward_matches_autograd(pattern, lq, lk):
    q, k, v = _inputs(3, 4, 2, lq, lk, 8)
    pad = _padding(3, lk)
    out = _eager(q, k, v, pattern, pad)
    dout = torch.randn_like(out)
    expected = torch.autograd.grad(out, (q, k, v), dout)
    got = exact_attention_backward(q.detach(), k.detach(), v.detach(), out.detach(), dout, Pattern(pattern), pad,
                                   rows_per_chunk=7)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)


@pytest.mark.slow  # the first compilation on a machine with a cold inductor cache takes tens of seconds
def test_flex_compiled_float32_matches_eager_and_caches_block_masks():
    """The fused kernel (torch.compile on CPU): causal self with padding and grouped-query heads."""
    attn = create_attention("flex", "CS", 4, 16)
    q, k, v = (t.detach().float() for t in _inputs(2, 4, 2, 40, 40, 16))
    pad = _padding(2, 40)
    with torch.no_grad():  # inputs that require grad, gradient off: no backward is wanted
        out = attn(q.requires_grad_(), k, v, pad)
    torch.testing.assert_close(out, _eager(q, k, v, "CS", pad), rtol=1e-5, atol=1e-5)
    assert attn.block_mask(2, 40, 40, pad, q.device) is attn.block_mask(2, 40, 40, pad.clone(), q.device)
    assert create_attention("flex", "NS", 4, 16).block_mask(2, 40, 40, None, q.device) is None


@pytest.mark.parametrize("pattern", ["NS", "CS", "NC", "CC"])
def test_flex_conformance(pattern):
    """In float64 (FlexAttention's unfused path): every check, no compilation in the test run; the compiled
    float32 kernel is checked above (and passes the float32 suite, which compiles a dozen graphs)."""
    report = run_conformance("flex", pattern, dtype="float64")
    assert report.status is Status.OK, report.message
