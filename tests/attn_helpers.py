"""Shared helpers of the attention tests: seeded inputs, a padding mask with holes, the comparison of an
attention's forward with its own reference() (outputs and gradients, at float64 tolerances; the shapes the
per-attention files check it at), exact attention as a limit, decoding against forward(), padding safety."""

import torch

from cab.attention.engine.blocksparse import check_layout_covers
from cab.patterns import Pattern, attention_mask


def random_qkv(b, hq, hkv, lq, lk, d, dtype=torch.float64, seed=0):
    """Seeded q (b, hq, lq, d), k and v (b, hkv, lk, d), all requiring gradients."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=gen, dtype=dtype)
    k = torch.randn(b, hkv, lk, d, generator=gen, dtype=dtype)
    v = torch.randn(b, hkv, lk, d, generator=gen, dtype=dtype)
    return [t.requires_grad_() for t in (q, k, v)]


def holey_padding(lk):
    """(2, lk) key padding: the second element's last 3 keys and the first element's key 1 are padding."""
    pad = torch.zeros(2, lk, dtype=torch.bool)
    pad[1, -3:] = True
    pad[0, 1] = True
    return pad


def assert_forward_matches_reference(attn, q, k, v, pad, wrt=None, seed=0):
    """forward and reference() agree in value and in the gradients w.r.t. `wrt` (default q, k, v) under a
    seeded cotangent."""
    out, ref = attn(q, k, v, pad), attn.reference(q, k, v, pad)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-11)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    wrt = (q, k, v) if wrt is None else wrt
    ours = torch.autograd.grad(out, wrt, cot, allow_unused=True)
    theirs = torch.autograd.grad(ref, wrt, cot, allow_unused=True)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a is None or b is None:  # an input neither formulation differentiates (a codebook behind argmin)
            assert a is None and b is None, f"gradient {i}: only one of forward and reference() reaches it"
        else:
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def assert_causal_prefixes_match(attn, length=40, stops=(1, 6, 17, 33)):
    """Causal self attention on seeded inputs: the output of every prefix equals the full run's first rows
    (a selection that read a future query or key would change them)."""
    q, k, v = (t.detach() for t in random_qkv(1, attn.num_heads, 2, length, length, attn.head_dim))
    full = attn(q, k, v)
    for stop in stops:
        torch.testing.assert_close(attn(q[:, :, :stop], k[:, :, :stop], v[:, :, :stop]), full[:, :, :stop])


def padded_garbage_inputs(pattern, dtype, seed=0):
    """B=3, H=4, L=48, D=32 keys with left (element 0: keys 0..7), interior (element 1: keys 9..18) and full
    (element 2) padding; padded keys and values (and the queries at padded positions of self patterns) hold
    N(0, 10^2) garbage, so masked scores run far outside float32's exp range."""
    gen = torch.Generator().manual_seed(seed)
    b, h, length, d = 3, 4, 48, 32
    pad = torch.zeros(b, length, dtype=torch.bool)
    pad[0, :8], pad[1, 9:19], pad[2] = True, True, True
    q, k, v = (torch.randn(b, h, length, d, generator=gen, dtype=torch.float64) for _ in range(3))
    garbage = lambda t: torch.where(pad[:, None, :, None], 10 * torch.randn(t.shape, generator=gen, dtype=t.dtype), t)  # noqa: E731
    k, v = garbage(k), garbage(v)
    if not Pattern.parse(pattern).cross:
        q = garbage(q)
    return [t.to(dtype).requires_grad_() for t in (q, k, v)], pad


def large_logit_inputs(dtype, seed=3, logit=200.0):
    """q, k, v (2, 4, 48, 32) with q and k scaled so that max |q.k| / sqrt(D) = logit."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 4, 48, 32, generator=gen, dtype=torch.float64) for _ in range(3))
    scale = (logit / ((q @ k.transpose(-1, -2)).abs().max() / 32 ** 0.5)).sqrt()
    return [t.to(dtype).requires_grad_() for t in (q * scale, k * scale, v)]


def assert_padding_safe(attn, pattern, dtype):
    (q, k, v), pad = padded_garbage_inputs(pattern, dtype)
    out = attn(q, k, v, pad)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype))
    assert torch.isfinite(out).all()
    blind = ~attention_mask(pattern, q.shape[-2], k.shape[-2], pad).any(-1)  # (B, 1, Lq): rows that see no key
    assert blind.any()
    assert (out.detach() * blind[..., None] == 0).all(), "rows that see no key must output exact zeros"
    for name, t in zip("qkv", (q, k, v)):
        assert torch.isfinite(t.grad).all(), f"non-finite d{name}"
    padded = pad[:, None, :, None].expand_as(k.grad)
    assert (k.grad[padded] == 0).all() and (v.grad[padded] == 0).all(), "gradient reached a padded key or value"


def assert_large_logits_finite(attn, dtype):
    q, k, v = large_logit_inputs(dtype)
    out = attn(q, k, v)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype))
    assert torch.isfinite(out).all()
    for name, t in zip("qkv", (q, k, v)):
        assert torch.isfinite(t.grad).all(), f"non-finite d{name} at |logit| 200 in {dtype}"


# (pattern, Lq, Lk) of the per-attention reference checks: every pattern, causal self with a query block
# shorter and longer than the keys, the cross patterns with Lq != Lk
SHAPES = [("NS", 37, 37), ("CS", 70, 70), ("CS", 5, 12), ("CS", 12, 5), ("NC", 23, 41), ("CC", 41, 23)]
# the same at lengths that cross chunks of about 5 several times
SHAPES_CHUNKED = [("NS", 37, 37), ("CS", 37, 37), ("CS", 9, 20), ("CS", 20, 9), ("NC", 23, 41), ("CC", 41, 23)]
# short lengths for the routing and block-selection attentions (blocks of 2 to 5 keys)
SHAPES_SHORT = [("NS", 23, 23), ("CS", 23, 23), ("CS", 19, 27), ("CS", 27, 19), ("NC", 27, 19), ("CC", 19, 27)]


def assert_reference_agrees(attn, lq, lk, params=()):
    """forward and reference() agree (assert_forward_matches_reference) on seeded B=2 inputs with the
    attention's heads and head size over 2 key/value heads, holey padding, in gradients w.r.t. q, k, v and
    `params`."""
    q, k, v = random_qkv(2, attn.num_heads, 2, lq, lk, attn.head_dim)
    assert_forward_matches_reference(attn, q, k, v, holey_padding(lk), wrt=(q, k, v, *params))


def assert_block_layout_matches_reference(attn, lq, lk, heads=1, batch=1):
    """A block-sparse attention at block size 8: assert_reference_agrees, and its block layout covers every
    element its mask shows (for `heads` heads and `batch` elements; at the padding's extents where the pattern
    depends on them)."""
    attn.block_size = 8
    assert_reference_agrees(attn, lq, lk)
    ext = attn.extent(2, lk, holey_padding(lk), "cpu")
    assert check_layout_covers(attn.layout(lq, lk, None, ext), attn.mask_fn(lq, lk, ext), heads, batch=batch)


def exact_attention_case(pattern):
    """Seeded q, k, v (B=2, H=2, D=8; 30 queries over 30 keys, 23 for the cross patterns), holey padding, the
    mask and exact masked softmax attention: (q, k, v, pad, mask, exact)."""
    lq, lk = (30, 23) if Pattern.parse(pattern).cross else (30, 30)
    q, k, v = (t.detach() for t in random_qkv(2, 2, 2, lq, lk, 8))
    pad = holey_padding(lk)
    mask = attention_mask(pattern, lq, lk, pad)
    exact = torch.softmax((q @ k.transpose(-1, -2) / 8 ** 0.5).masked_fill(~mask, float("-inf")), -1) @ v
    return q, k, v, pad, mask, exact


def assert_is_exact_attention(attn, pattern, counts_pairs=True):
    """On exact_attention_case: the output is exact attention and (counts_pairs) computed_pairs counts every
    visible pair."""
    q, k, v, pad, mask, exact = exact_attention_case(pattern)
    torch.testing.assert_close(attn(q, k, v, pad), exact)
    if counts_pairs:
        assert attn.computed_pairs(q, k, v, pad) == int(mask.expand(2, 2, *mask.shape[-2:]).sum())


def assert_decode_matches_forward(attn, prefills, repeat=False):
    """Causal self, seeded (B=2, 30 tokens, 2 key/value heads), the second element's first 2 keys padded when
    the prefill holds them: token by token from `prefill` prefilled tokens, every output row equals forward()'s
    (rtol 1e-9, atol 1e-11); `repeat`: a second step from the same state gives the same row, and decoding goes
    on from the second. Returns, per prefill, the state's bytes after decode_init and at the end."""
    q, k, v = (t.detach() for t in random_qkv(2, attn.num_heads, 2, 30, 30, attn.head_dim))
    pad = torch.zeros(2, 30, dtype=torch.bool)
    pad[1, :2] = True
    sizes = []
    for prefill in prefills:
        mask = pad if prefill >= 2 else torch.zeros_like(pad)  # padding only inside the prefilled context
        full = attn(q, k, v, mask)
        state = attn.decode_init(k[:, :, :prefill], v[:, :, :prefill], mask[:, :prefill])
        size = attn.decode_state_bytes(state)
        for t in range(prefill, 30):
            step = (q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1])
            out, state_after = attn.decode_step(state, *step)
            if repeat:
                again, state_after = attn.decode_step(state, *step)
                torch.testing.assert_close(again, out, rtol=0, atol=0)
            torch.testing.assert_close(out[:, :, 0], full[:, :, t], rtol=1e-9, atol=1e-11)
            state = state_after
        sizes.append((size, attn.decode_state_bytes(state)))
    return sizes


def assert_unpadded_decode_matches_forward(attn, pattern):
    """Seeded (B=2, 13 queries, seed 6) over 13 keys (CS: 5 prefilled, the rest stepped in) or 9 keys (CC: all
    in the state): every decoded row equals forward()'s (rtol 1e-10, atol 1e-12). Returns the final state."""
    causal_self = pattern == "CS"
    lk = 13 if causal_self else 9
    q, k, v = (t.detach() for t in random_qkv(2, attn.num_heads, 2, 13, lk, attn.head_dim, seed=6))
    full = attn(q, k, v)
    prefill = 5 if causal_self else lk
    state = attn.decode_init(k[:, :, :prefill], v[:, :, :prefill])
    for t in range(5 if causal_self else 0, 13):
        step = (k[:, :, t:t + 1], v[:, :, t:t + 1]) if causal_self else ()
        out, state = attn.decode_step(state, q[:, :, t:t + 1], *step)
        torch.testing.assert_close(out[:, :, 0], full[:, :, t], rtol=1e-10, atol=1e-12)
    return state


def assert_appended_padding_changes_nothing(attn, q, k, v, extra, rtol, atol):
    """`extra` positions of N(0, 30^2) garbage (the global generator) appended to q, k, v and padded leave the
    real rows as they were."""
    length = q.shape[-2]
    garbage = [torch.randn(*t.shape[:2], extra, t.shape[-1], dtype=torch.float64) * 30 for t in (q, k, v)]
    qp, kp, vp = (torch.cat([t, e], dim=2) for t, e in zip((q, k, v), garbage))
    pad = torch.arange(length + extra)[None] >= length
    torch.testing.assert_close(attn(qp, kp, vp, pad)[:, :, :length], attn(q, k, v), rtol=rtol, atol=atol)
