"""The exact attentions (vanilla, sdpa, memory_efficient) against an independent per-row float64 reference,
outputs and gradients, over the four patterns, padding, grouped-query heads and odd shapes."""

import math

import pytest
import torch

import cab
from cab.check import oracle_attention

EXACT = ["vanilla", "sdpa", "memory_efficient"]
SMALL_CHUNKS = {"memory_efficient": {"query_chunk_size": 16, "key_chunk_size": 8}}


def per_row_reference(q, k, v, pattern, pad=None):
    """Softmax attention one query row at a time, written from the definition."""
    pattern = cab.Pattern.parse(pattern)
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    out = torch.zeros(b, hq, lq, v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            kh, vh = k[bi, h // (hq // hkv)].double(), v[bi, h // (hq // hkv)].double()
            for i in range(lq):
                keys = [j for j in range(lk)
                        if (pad is None or not pad[bi, j]) and (pattern is not cab.Pattern.CS or j <= i + lk - lq)]
                if not keys:
                    continue
                s = torch.stack([q[bi, h, i].double() @ kh[j] / math.sqrt(d) for j in keys])
                w = torch.softmax(s, dim=0)
                out[bi, h, i] = (w[:, None] * vh[keys]).sum(0)
    return out


def _inputs(pattern, lq=21, lk=None, hq=4, hkv=2, d=12, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    lk = lk or (lq if not cab.Pattern.parse(pattern).cross else lq + 9)

    def mk(*s):
        return torch.randn(*s, generator=g, dtype=dtype).requires_grad_()

    return mk(2, hq, lq, d), mk(2, hkv, lk, d), mk(2, hkv, lk, d)


@pytest.mark.parametrize("name", EXACT)
@pytest.mark.parametrize("pattern", ["NS", "CS", "NC", "CC"])
def test_matches_per_row_reference_with_padding_and_gqa(name, pattern):
    q, k, v = _inputs(pattern)
    pad = torch.zeros(2, k.shape[2], dtype=torch.bool)
    pad[1, -4:] = True
    attn = cab.create_attention(name, pattern, 4, 12, **SMALL_CHUNKS.get(name, {}))
    out = attn(q, k, v, pad)
    ref = per_row_reference(q.detach(), k.detach(), v.detach(), pattern, pad)
    assert out.dtype == torch.float64 and out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("name", EXACT)
@pytest.mark.parametrize("pattern", ["NS", "CS", "CC"])
def test_gradients_match_the_float64_oracle(name, pattern):
    """Gradients against cab.check's row-by-row float64 oracle (an independent formulation, vanilla included:
    comparing vanilla with itself would prove nothing)."""
    q, k, v = _inputs(pattern, lq=19)
    dout = torch.randn(2, 4, 19, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    attn = cab.create_attention(name, pattern, 4, 12, **SMALL_CHUNKS.get(name, {}))
    got = torch.autograd.grad(attn(q, k, v), (q, k, v), dout)
    want = torch.autograd.grad(oracle_attention(q, k, v, pattern), (q, k, v), dout)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("name", EXACT)
def test_causal_decode_alignment(name):
    """A few new queries over a longer past (KV-cache decode) are aligned bottom-right."""
    q, k, v = _inputs("NS", lq=3, lk=11)
    attn = cab.create_attention(name, "CS", 4, 12, **SMALL_CHUNKS.get(name, {}))
    ref = per_row_reference(q.detach(), k.detach(), v.detach(), "CS")
    torch.testing.assert_close(attn(q, k, v), ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("name", EXACT)
def test_rows_without_visible_keys_are_zero_and_gradients_finite(name):
    q, k, v = _inputs("NC", lq=5, lk=6)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[0] = True  # the first batch element has no real key at all
    out = cab.create_attention(name, "NC", 4, 12, **SMALL_CHUNKS.get(name, {}))(q, k, v, pad)
    assert torch.all(out[0] == 0) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_error_is_comparable_to_eager(dtype):
    q, k, v = (t.detach() for t in _inputs("CS", lq=64, lk=64, d=32, dtype=torch.float64))
    ref = per_row_reference(q, k, v, "CS")
    errs = {}
    for name in EXACT:
        attn = cab.create_attention(name, "CS", 4, 32, **SMALL_CHUNKS.get(name, {}))
        errs[name] = (attn(q.to(dtype), k.to(dtype), v.to(dtype)).double() - ref).abs().max().item()
    assert errs["sdpa"] <= 2 * errs["vanilla"] + 1e-6
    assert errs["memory_efficient"] <= 2 * errs["vanilla"] + 1e-6


@pytest.mark.parametrize("pattern", ["NS", "CS"])
def test_memory_efficient_saves_no_quadratic_tensor(pattern):
    """With chunks smaller than L, no storage of size Lq x Lk is kept for backward (O(L) memory), counting
    whole storages so that a small view of a full-size mask is caught too."""
    lq = 256
    q, k, v = (torch.randn(1, 2, lq, 16, requires_grad=True) for _ in range(3))
    saved = []

    def pack(t):
        saved.append(t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        attn = cab.create_attention("memory_efficient", pattern, 2, 16, query_chunk_size=64, key_chunk_size=64)
        out = attn(q, k, v)
    assert max(saved) < lq * lq  # a full bool mask is L*L bytes, a full float32 score matrix 2*4*L*L
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


@pytest.mark.parametrize("name", ["vanilla", "sdpa"])
@pytest.mark.parametrize("pattern", ["NS", "CS"])
def test_segments_equal_separate_runs(name, pattern):
    """Packed segments (runs of ids; id 4 recurs as a separate segment) with padding equal each segment
    run alone, for the exact attentions that take segment_ids."""
    q, k, v = (t.detach() for t in _inputs(pattern, lq=17))
    ids = torch.tensor([[4] * 5 + [1] * 3 + [4] * 9, [0] * 10 + [2] * 7])
    pad = torch.zeros(2, 17, dtype=torch.bool)
    pad[1, -2:] = True
    attn = cab.create_attention(name, pattern, 4, 12)
    out = attn(q, k, v, pad, segment_ids=ids)
    for b, spans in enumerate([[(0, 5), (5, 8), (8, 17)], [(0, 10), (10, 15)]]):
        for s, e in spans:
            alone = per_row_reference(q[b:b + 1, :, s:e], k[b:b + 1, :, s:e], v[b:b + 1, :, s:e], pattern)
            torch.testing.assert_close(out[b:b + 1, :, s:e], alone, atol=1e-10, rtol=1e-10)


def test_segment_ids_are_refused_where_unsupported():
    q, k, v = (t.detach() for t in _inputs("NS", lq=6))
    ids = torch.zeros(2, 6, dtype=torch.long)
    assert not cab.get_spec("memory_efficient").cls.supports_segments
    with pytest.raises(TypeError):
        cab.create_attention("memory_efficient", "NS", 4, 12)(q, k, v, segment_ids=ids)
    qc, kc, vc = (t.detach() for t in _inputs("NC", lq=6))
    with pytest.raises(ValueError, match="self patterns"):
        cab.create_attention("vanilla", "NC", 4, 12)(qc, kc, vc, segment_ids=ids)
