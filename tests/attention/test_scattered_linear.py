"""scattered_linear (ScatterFormer SLA, M23): forward vs reference (with and without segments, chunk
boundaries inside and across segments), an independent per-window computation, cu_seqlens packing,
decoding, conformance (including the segments check) with small chunks."""

import pytest
import torch
import torch.nn.functional as F

from cab import create_attention
from cab.patterns import segment_ids_from_cu_seqlens
from tests.attn_helpers import assert_reference_agrees, holey_padding, random_qkv

IDS = torch.tensor([[3] * 7 + [0] * 1 + [3] * 9 + [1] * 20, [5] * 20 + [2] * 17])  # 37 tokens; id 3 recurs


@pytest.mark.parametrize("pattern,lq,lk,chunk", [
    ("NS", 37, 37, 5), ("NS", 37, 37, 64), ("CS", 37, 37, 5), ("CS", 37, 37, 64), ("CS", 9, 20, 4), ("CS", 20, 9, 4),
])
def test_forward_matches_reference_with_gradients(pattern, lq, lk, chunk):
    attn = create_attention("scattered_linear", pattern, 4, 8, chunk_size=chunk)
    assert_reference_agrees(attn, lq, lk)


@pytest.mark.parametrize("pattern", ["NS", "CS"])
@pytest.mark.parametrize("chunk", [3, 8, 64])
def test_segments_match_reference_with_gradients(pattern, chunk):
    attn = create_attention("scattered_linear", pattern, 4, 8, chunk_size=chunk)
    q, k, v = random_qkv(2, 4, 2, 37, 37, 8, seed=1)
    pad = holey_padding(37)
    out, ref = attn(q, k, v, pad, segment_ids=IDS), attn.reference(q, k, v, pad, segment_ids=IDS)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-11)
    cot = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), cot), torch.autograd.grad(ref, (q, k, v), cot)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_noncausal_segments_equal_the_per_window_formula():
    """Independent of the mask: S_w = sum relu(k) v^T and z_w = sum relu(k) per window (the paper's and the
    released code's scatter form), out = relu(q) S_w / (relu(q) z_w + eps), one window at a time."""
    attn = create_attention("scattered_linear", "NS", 2, 6, chunk_size=4)
    q, k, v = (t.detach() for t in random_qkv(1, 2, 2, 30, 30, 6, seed=2))
    cu = torch.tensor([0, 11, 12, 25, 30])
    out = attn(q, k, v, segment_ids=segment_ids_from_cu_seqlens(cu))
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        pk, vv, pq = F.relu(k[0, :, s:e]), v[0, :, s:e], F.relu(q[0, :, s:e])
        kv, z = pk.transpose(-1, -2) @ vv, pk.sum(dim=-2)
        want = (pq @ kv) / ((pq @ z.unsqueeze(-1)) + 1e-6)
        torch.testing.assert_close(out[0, :, s:e], want, rtol=1e-10, atol=1e-12)


def test_no_segment_ids_is_one_segment_and_cross_patterns_are_refused():
    attn = create_attention("scattered_linear", "CS", 4, 8, chunk_size=4)
    q, k, v = (t.detach() for t in random_qkv(2, 4, 4, 21, 21, 8))
    ones = torch.zeros(2, 21, dtype=torch.long)
    torch.testing.assert_close(attn(q, k, v, segment_ids=ones), attn(q, k, v), rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError):
        attn(q[:, :, :20], k, v, segment_ids=ones)  # Lq != Lk with segments
    for pattern in ("NC", "CC"):
        with pytest.raises(ValueError, match="segment"):
            create_attention("scattered_linear", pattern, 4, 8)


def test_decode_matches_forward_row_by_row():
    attn = create_attention("scattered_linear", "CS", 4, 8)
    q, k, v = (t.detach() for t in random_qkv(2, 4, 2, 15, 15, 8, seed=3))
    full = attn(q, k, v)
    state = attn.decode_init(k[:, :, :6], v[:, :, :6])
    for t in range(6, 15):
        out, state = attn.decode_step(state, q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1])
        torch.testing.assert_close(out[:, :, 0], full[:, :, t], rtol=1e-10, atol=1e-12)
    assert attn.decode_state_bytes(state) == 2 * 4 * (8 * 8 + 8) * 8  # (S, z) per head in float64
