"""flash and flex: flash-attn's calling convention driven through stand-in kernels written from its
documented semantics (no GPU here), availability reasons, FlexAttention against eager attention (the
unfused float64 path) and against the float64 oracle (the compiled kernel in float32 and bfloat16 on padded
batches, every pattern, and the AVX2 code path whose q k^T micro-GEMM needs q and k padded), the chunked
CPU backward, and conformance."""

import pytest
import torch
from torch._dynamo.utils import counters

from cab import create_attention
from cab.attention import flash as flex_module
from cab.attention.flash import FlashAttention, FlexAttention, exact_attention_backward, flash_forward
from cab.check import run_conformance
from cab.check.oracle import oracle_attention
from cab.patterns import Pattern, attention_mask
from cab.status import Status
from tests.attn_helpers import random_qkv

needs_cpu_flex = pytest.mark.skipif(FlexAttention.unavailable_reason("cpu") is not None,
                                    reason=f"flex on CPU: {FlexAttention.unavailable_reason('cpu')}")

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


# the compiled kernel against the oracle on padded batches ---------------------------------------------------

# one shape for every compiled case below, so the graphs compiled for one test serve the next: Lq != Lk,
# neither a multiple of 128, and Lk = 8 (mod 16), the key-block length that AVX2 kernels got wrong (issue 16)
FLEX_B, FLEX_HQ, FLEX_HKV, FLEX_LQ, FLEX_LK, FLEX_D = 4, 4, 2, 37, 40, 16
FLEX_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # bfloat16: the kernel rounds P to bfloat16 for P V


def _padding_layouts(lk):
    """(4, lk) key padding, one layout per batch element: right, every key padded, left (under CS the first
    rows see no key), interior (real keys on both sides of a padded run, plus one more hole). The last
    element has real keys, so the kernel's last key block is computed, not skipped."""
    pad = torch.zeros(4, lk, dtype=torch.bool)
    pad[0, -7:] = True
    pad[1] = True
    pad[2, :9] = True
    pad[3, 5:lk - 5] = True
    pad[3, 1] = True
    return pad


def _nan_tailed(t):
    """t, stored at the start of a NaN-filled buffer: a kernel that reads past its end (issue 16: the AVX2
    q k^T micro-GEMM read 8 keys past the last key block) gets NaN there, not whatever memory follows."""
    buf = torch.full((t.numel() + 64 * t.shape[-1],), float("nan"), dtype=t.dtype)
    buf[:t.numel()] = t.flatten()
    return buf[:t.numel()].view(t.shape)


def _flex_inputs(dtype, seed=0):
    q, k, v = random_qkv(FLEX_B, FLEX_HQ, FLEX_HKV, FLEX_LQ, FLEX_LK, FLEX_D, dtype=torch.float32, seed=seed)
    return [_nan_tailed(t.detach().to(dtype)) for t in (q, k, v)]


def _assert_matches_oracle(out, q, k, v, pattern, pad):
    """out is the oracle's attention (on the same, possibly bfloat16, inputs) within the dtype's tolerance,
    finite, and exactly zero on every row that sees no key."""
    assert out.dtype == q.dtype and not out.isnan().any()
    tol = FLEX_TOL[q.dtype]
    torch.testing.assert_close(out.double(), oracle_attention(q, k, v, pattern, pad), rtol=tol, atol=tol)
    seen = attention_mask(pattern, q.shape[-2], k.shape[-2], pad).any(-1).expand(out.shape[:-1])
    assert (out[~seen] == 0).all()
    return seen


@pytest.mark.slow  # the first compilation on a machine with a cold inductor cache takes tens of seconds
@needs_cpu_flex
def test_flex_compiled_float32_matches_eager_and_caches_block_masks():
    """The fused kernel (torch.compile on CPU): causal self with padding and grouped-query heads, at the shape
    every compiled case below shares (so the kernels compiled here serve them: the module runs on one xdist
    worker, tests/conftest.py)."""
    attn = create_attention("flex", "CS", FLEX_HQ, FLEX_D)
    q, k, v = _flex_inputs(torch.float32)
    pad = _padding_layouts(FLEX_LK)
    with torch.no_grad():  # inputs that require grad, gradient off: no backward is wanted
        out = attn(q.requires_grad_(), k, v, pad)
    torch.testing.assert_close(out, _eager(q, k, v, "CS", pad), rtol=1e-5, atol=1e-5)
    assert attn.block_mask(FLEX_B, FLEX_LQ, FLEX_LK, pad, q.device) is \
        attn.block_mask(FLEX_B, FLEX_LQ, FLEX_LK, pad.clone(), q.device)
    # the grad mode is not part of the kernel: the same call with gradients enabled traces no second graph
    graphs = counters["stats"]["unique_graphs"]
    torch.testing.assert_close(attn(q.detach(), k, v, pad), out, rtol=0, atol=0)
    assert counters["stats"]["unique_graphs"] == graphs
    # the pattern is data to the compiled kernel: the other patterns' first calls at this shape compile nothing
    for pattern in ("NS", "NC", "CC"):
        with torch.no_grad():
            other = create_attention("flex", pattern, FLEX_HQ, FLEX_D)
            before = dict(counters["inductor"])
            other(q, k, v, pad)
            compiled = {c: n - before.get(c, 0) for c, n in counters["inductor"].items() if n != before.get(c, 0)}
        assert not compiled.get("fxgraph_cache_miss") and not compiled.get("cpp_templated_kernel_counter"), \
            (pattern, compiled)


@needs_cpu_flex
@pytest.mark.parametrize("pattern", ["NS", "CS", "NC", "CC"])
def test_flex_conformance(pattern):
    """In float64 (FlexAttention's unfused path): every check, no compilation in the test run; the compiled
    float32 kernel is checked above (and passes the float32 suite, which compiles a dozen graphs)."""
    report = run_conformance("flex", pattern, dtype="float64")
    assert report.status is Status.OK, report.message


@pytest.mark.slow  # a few compilations (seconds each); the graphs are reused across the parametrisations
@needs_cpu_flex
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("pattern", ["NS", "CS", "NC", "CC"])
def test_flex_compiled_matches_oracle_on_padded_batches(pattern, dtype):
    attn = create_attention("flex", pattern, FLEX_HQ, FLEX_D)
    q, k, v = _flex_inputs(dtype)
    pad = _padding_layouts(FLEX_LK)
    with torch.no_grad():
        out = attn(q, k, v, pad)
    assert attn.backend == flex_module.flex_variant(q, k, attn.block_mask(FLEX_B, FLEX_LQ, FLEX_LK, pad, "cpu"))
    assert attn.backend in ("flex", "flex-qkpad24")  # the compiled kernel, never a silent fallback
    seen = _assert_matches_oracle(out, q, k, v, pattern, pad)
    assert not seen[1].any() and (pattern != "CS" or not seen[2, :, :6].any())  # rows with no key were checked


@pytest.mark.slow
@needs_cpu_flex
def test_flex_compiled_block_masks_follow_batch_size_and_padding():
    """The block-mask cache keys on the batch size and the padding: batches of 4, 2 (a prefix of the same
    padding) and 3 (other padding) each get their own mask and the oracle's numbers."""
    attn = create_attention("flex", "CS", FLEX_HQ, FLEX_D)
    q, k, v = _flex_inputs(torch.float32, seed=1)
    pad = _padding_layouts(FLEX_LK)
    other = pad[[3, 0, 2]].roll(3, dims=1)
    masks = []
    for rows, p in ((slice(0, 4), pad), (slice(0, 2), pad[:2]), (slice(1, 4), other)):
        qb, kb, vb = q[rows], k[rows], v[rows]
        with torch.no_grad():
            out = attn(qb, kb, vb, p)
        _assert_matches_oracle(out, qb, kb, vb, "CS", p)
        masks.append(attn.block_mask(p.shape[0], FLEX_LQ, FLEX_LK, p.clone(), q.device))
    assert len({id(m) for m in masks}) == 3
    with pytest.raises(ValueError, match="key_padding_mask"):
        attn(q, k, v, pad[:2])


def test_flex_cpu_qk_dim_pads_only_where_the_micro_gemm_goes_wrong(monkeypatch):
    """q and k are padded to head dim 24 exactly where a key block of 8 (mod 16) keys meets head dim 8 or 16
    under 8-float vectors (AVX2); with 16-float vectors (AVX-512) never."""
    monkeypatch.setattr(flex_module, "_cpu_float_lanes", lambda: 16)
    assert all(flex_module.cpu_flex_qk_dim(d, lk) == d for d in (8, 16) for lk in (8, 24, 40, 136))
    monkeypatch.setattr(flex_module, "_cpu_float_lanes", lambda: 8)
    qk_dim = flex_module.cpu_flex_qk_dim
    assert [qk_dim(16, lk) for lk in (8, 24, 40, 136, 264)] == [24] * 5  # last key block 8 (mod 16) long
    assert [qk_dim(8, lk) for lk in (40, 1544)] == [24, 24]
    assert [qk_dim(16, lk) for lk in (16, 33, 48, 100, 128, 256)] == [16] * 6
    assert [qk_dim(d, 40) for d in (4, 12, 24, 32, 64)] == [4, 12, 24, 32, 64]  # K % 8 != 0 or K >= 24
    assert qk_dim(16, 72, kv_block=64) == 24 and qk_dim(16, 64, kv_block=64) == 16
    assert qk_dim(16, 200, kv_block=40) == 24  # every full block is 40 = 8 (mod 16) long


@pytest.mark.slow
@needs_cpu_flex
def test_flex_compiled_avx2_kernel_matches_oracle():
    """Issue 16: with 8-float vectors (AVX2; forced here by inductor's cpp.simdlen=256 where the CPU has
    AVX-512) the kernel's q k^T micro-GEMM wrote past the score rows for Lk = 40, head dim 16: zero, wrong
    or NaN rows, varying run to run. flex pads q and k to head dim 24 there and says so in `backend`."""
    from torch._inductor.cpu_vec_isa import valid_vec_isa_list

    if not any(isa.bit_width() == 256 for isa in valid_vec_isa_list()):
        pytest.skip("this CPU has no 256-bit vector ISA for inductor")
    torch._dynamo.reset()  # compile afresh under simdlen=256, and leave no AVX2 graph to the tests after
    try:
        with torch._inductor.config.patch({"cpp.simdlen": 256}):
            for pattern in ("NS", "CS"):
                attn = create_attention("flex", pattern, FLEX_HQ, FLEX_D)
                q, k, v = _flex_inputs(torch.float32, seed=2)
                pad = _padding_layouts(FLEX_LK)
                with torch.no_grad():
                    out = attn(q, k, v, pad)
                assert attn.backend == "flex-qkpad24"
                _assert_matches_oracle(out, q, k, v, pattern, pad)
    finally:
        torch._dynamo.reset()


def test_flex_refuses_a_cpu_its_kernel_cannot_be_compiled_for(monkeypatch):
    """Without AVX2 (here: ATEN_CPU_CAPABILITY=default) inductor cannot build the CPU kernel: flex says so
    in unavailable_reason, and a float32 call raises that reason rather than an error from inside inductor."""
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    reason = FlexAttention.unavailable_reason("cpu")
    assert reason and "AVX2" in reason
    q, k, v = (t.detach().float() for t in _inputs(1, 2, 2, 4, 4, 8))
    with pytest.raises(RuntimeError, match="AVX2"):
        create_attention("flex", "NS", 2, 8)(q, k, v)
