"""Head-level window/full mechanisms (duo M50, moa M49, aha M47, qada M48): forward vs reference (outputs and
gradients, GQA, holey padding, Lq != Lk), router decisions vs their naive loops, head-level semantics read off
gradients, the second-moment estimate, computed pairs, conformance with small windows."""

import math

import pytest
import torch

from cab import create_attention
from tests.attn_helpers import assert_forward_matches_reference, assert_reference_agrees, holey_padding, random_qkv

SMALL = {
    "duo": dict(sinks=2, recent=5, retrieval_heads=(1,)),
    "moa": dict(alphas=(3, 4, 2, 8), betas=(0.0, 0.1, 0.2, 0.05), sinks=1),
    "aha": dict(window=4, bias=0.2),
    "qada": dict(window=6, sinks=2, threshold=0.7),
}
SHAPES = [("CS", 37, 37), ("CS", 23, 37), ("CS", 37, 23), ("NS", 20, 31)]


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("pattern,lq,lk", SHAPES)
def test_forward_matches_reference_with_gradients(name, pattern, lq, lk):
    attn = create_attention(name, pattern, 4, 8, **SMALL[name])
    assert_reference_agrees(attn, lq, lk)


@pytest.mark.parametrize("name", ["aha", "qada"])
@pytest.mark.parametrize("pattern,lq,lk", SHAPES)
def test_router_matches_naive_loop_and_takes_both_branches(name, pattern, lq, lk):
    attn = create_attention(name, pattern, 4, 8, **SMALL[name])
    q, k, _ = random_qkv(2, 4, 2, lq, lk, 8)
    pad = holey_padding(lk)
    _, fast = attn.config(q, k, pad)
    _, slow = attn.reference_config(q, k, pad)
    assert torch.equal(fast, slow)
    if (pattern, lq, lk) == ("CS", 37, 37):
        assert 0 < fast.double().mean() < 1


def _seen(attn, lq, lk, heads=2):
    """(H, Lq, Lk) bool: which keys each output row depends on (gradient of the row w.r.t. v)."""
    q, k, v = random_qkv(1, heads, heads, lq, lk, 4, seed=3)
    out = attn(q, k, v)
    rows = []
    for h in range(heads):
        per = []
        for i in range(lq):
            (g,) = torch.autograd.grad(out[0, h, i].sum(), v, retain_graph=True)
            per.append(g[0, h].abs().sum(-1) > 0)
        rows.append(torch.stack(per))
    return torch.stack(rows)


def test_duo_retrieval_heads_full_streaming_heads_sinks_plus_recent():
    seen = _seen(create_attention("duo", "CS", 2, 4, retrieval_heads=(0,), sinks=2, recent=3), 12, 12)
    i, j = torch.arange(12)[:, None], torch.arange(12)[None, :]
    assert torch.equal(seen[0], j <= i)
    assert torch.equal(seen[1], (j <= i) & ((i - j < 3) | (j < 2)))


def test_moa_span_grows_with_visible_keys():
    """CS: row i sees N_i = i + 1 keys, window ceil(alpha + beta N_i) keys; NS: N = Lk for every row."""
    seen = _seen(create_attention("moa", "CS", 2, 4, alphas=(2, 1), betas=(0.0, 0.5), sinks=0), 12, 12)
    i, j = torch.arange(12)[:, None], torch.arange(12)[None, :]
    assert torch.equal(seen[0], (j <= i) & (i - j < 2))
    assert torch.equal(seen[1], (j <= i) & (i - j < torch.ceil(1 + 0.5 * (i + 1))))
    ns = _seen(create_attention("moa", "NS", 2, 4, alphas=(2, 1), betas=(0.0, 0.25), sinks=0), 12, 12)
    assert torch.equal(ns[1], (i - j).abs() <= math.ceil(1 + 0.25 * 12) - 1)


def test_aha_rows_are_full_or_window_by_the_router():
    attn = create_attention("aha", "CS", 2, 4, window=3)
    q, _, _ = random_qkv(1, 2, 2, 12, 12, 4, seed=3)
    full = attn.route(q)[0]
    seen = _seen(attn, 12, 12)
    i, j = torch.arange(12)[:, None], torch.arange(12)[None, :]
    expect = torch.where(full[..., None], (j <= i)[None], ((j <= i) & (i - j < 3))[None])
    assert torch.equal(seen, expect)
    assert bool(full.any()) and not bool(full.all())


def test_qada_second_moment_estimate_tracks_gaussian_far_mass():
    """Keys i.i.d. Gaussian: the far scores are Gaussian with the window's mean and variance, so the estimate
    log n_far + m + s2/2 is close to the true log-sum-exp of the far scores for a long context."""
    gen = torch.Generator().manual_seed(0)
    d, lk = 4, 6000
    q = torch.randn(1, 1, 1, d, generator=gen, dtype=torch.float64) * 0.5
    k = torch.randn(1, 1, lk, d, generator=gen, dtype=torch.float64)
    scores = (k[0, 0] @ q[0, 0, 0]) / math.sqrt(d)
    window = scores[-400:]
    est = math.log(lk - 400) + float(window.mean()) + float(window.var(unbiased=False)) / 2
    true = float(torch.logsumexp(scores[:-400], 0))
    assert abs(est - true) < 0.05
    # and the router's decision is that comparison: a threshold below / above the far share flips it
    attn_lo = create_attention("qada", "CS", 1, d, window=400, sinks=0, threshold=0.05)
    attn_hi = create_attention("qada", "CS", 1, d, window=400, sinks=0, threshold=0.995)
    assert bool(attn_lo.route(q, k, None).all()) and not bool(attn_hi.route(q, k, None).any())


def test_computed_pairs():
    """duo: streaming heads count `local`'s blocked pairs, retrieval heads Lq * Lk; moa: chunk spans."""
    q, k, v = random_qkv(2, 4, 4, 40, 40, 8)
    duo = create_attention("duo", "NS", 4, 8, retrieval_heads=(0, 1), sinks=0, recent=16)
    local = create_attention("local", "NS", 2, 8, window=15)
    assert duo.computed_pairs(q, k, v) == 2 * 2 * 40 * 40 + local.computed_pairs(q[:, :2], k[:, :2], v[:, :2])
    moa = create_attention("moa", "CS", 4, 8, alphas=(3, 3, 3, 3), betas=(0, 0, 0, 0), sinks=1)
    q, k, v = (t.detach() for t in random_qkv(2, 4, 4, 300, 300, 8))
    # rows in chunks of 128, each scoring keys from its first row minus the half-width 2 to its last row
    assert moa.computed_pairs(q, k, v) == 2 * 4 * (128 * (128 + 1) + 128 * (130 + 1) + 44 * (46 + 1))


@pytest.mark.parametrize("pattern,lq,lk", [("CS", 300, 300), ("CS", 170, 290), ("NS", 260, 240)])
def test_moa_multi_chunk_matches_explicit_mask(pattern, lq, lk):
    """Lengths past one 128-row chunk, heads with windows from 2 to ~150 keys: the chunked key ranges equal
    the explicit-mask form (outputs and gradients)."""
    from cab.attention.engine import head_windows

    attn = create_attention("moa", pattern, 2, 4, alphas=(3, 20), betas=(0.0, 0.45), sinks=2)
    q, k, v = random_qkv(1, 2, 1, lq, lk, 4)
    pad = torch.zeros(1, lk, dtype=torch.bool)
    pad[0, [1, 150]] = True
    hw = attn.half_widths(q, k, pad)
    out = attn(q, k, v, pad)
    ref = head_windows.banded_reference(q, k, v, pad, attn.pattern, hw, 2)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-11)
    cot = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), cot), torch.autograd.grad(ref, (q, k, v), cot)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("pattern,lq,lk", [("CS", 300, 300), ("NS", 260, 240)])
def test_qada_router_multi_chunk_matches_naive_loop(pattern, lq, lk):
    attn = create_attention("qada", pattern, 2, 4, window=20, sinks=3, threshold=0.9)
    q, k, _ = random_qkv(1, 2, 1, lq, lk, 4)
    pad = torch.zeros(1, lk, dtype=torch.bool)
    pad[0, [1, 150]] = True
    fast, slow = attn.config(q, k, pad)[1], attn.reference_config(q, k, pad)[1]
    assert torch.equal(fast, slow) and 0 < fast.double().mean() < 1


@pytest.mark.parametrize("hkv,retrieval", [(4, (1,)), (1, (0,)), (2, (0, 1))])
def test_duo_decoding_matches_forward(hkv, retrieval):
    """Token by token from several prefills (GQA: a KV head shared by retrieval and streaming heads keeps
    the whole cache, its streaming heads masked to their window)."""
    attn = create_attention("duo", "CS", 4, 8, retrieval_heads=retrieval, sinks=2, recent=5)
    q, k, v = (t.detach() for t in random_qkv(2, 4, hkv, 20, 20, 8))
    pad = torch.zeros(2, 20, dtype=torch.bool)
    pad[1, 0] = True
    full = attn(q, k, v, pad)
    for prefill in (1, 3, 12):
        state = attn.decode_init(k[:, :, :prefill], v[:, :, :prefill], pad[:, :prefill], capacity=20)
        rows = []
        for t in range(prefill, 20):
            out, state = attn.decode_step(state, q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1])
            rows.append(out)
        torch.testing.assert_close(torch.cat(rows, 2), full[:, :, prefill:], rtol=1e-10, atol=1e-12)


def test_duo_streaming_heads_hold_a_constant_cache():
    """One retrieval KV head of four: the state holds ~1/4 of the full cache plus 3 x (sinks + recent)."""
    q, k, v = (t.detach() for t in random_qkv(1, 4, 4, 1, 200, 8))
    duo = create_attention("duo", "CS", 4, 8, retrieval_heads=(0,), sinks=2, recent=5)
    everything = create_attention("duo", "CS", 4, 8, retrieval_heads=(0, 1, 2, 3), sinks=2, recent=5)
    small = duo.decode_state_bytes(duo.decode_init(k, v, capacity=200))
    large = everything.decode_state_bytes(everything.decode_init(k, v, capacity=200))
    assert small < 0.3 * large


def test_full_rows_in_several_causal_chunks_match_reference():
    """CS full rows are scored in chunks of 256 rows (each up to its last row's keys): 600 rows, 3 chunks."""
    attn = create_attention("duo", "CS", 2, 4, retrieval_heads=(0,), sinks=1, recent=3)
    q, k, v = random_qkv(1, 2, 1, 600, 600, 4)
    pad = torch.zeros(1, 600, dtype=torch.bool)
    pad[0, [0, 300]] = True
    assert_forward_matches_reference(attn, q, k, v, pad)
    local = create_attention("local", "CS", 1, 4, window=2, sinks=1)
    chunks = 256 * 256 + 256 * 512 + 88 * 600
    assert attn.computed_pairs(q, k, v) == chunks + local.computed_pairs(q[:, :1], k, v)
