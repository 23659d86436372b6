"""Shared helpers of the attention tests: seeded inputs, a padding mask with holes, and the comparison of an
attention's forward with its own reference(), outputs and gradients, at float64 tolerances."""

import torch

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
