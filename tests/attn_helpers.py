"""Shared helpers of the attention tests: seeded inputs, a padding mask with holes, and the comparison of an
attention's forward with its own reference(), outputs and gradients, at float64 tolerances."""

import torch


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
