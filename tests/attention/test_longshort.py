"""longshort: forward vs its row-by-row reference, padding, causality, conformance, and a cross-check of
the causal version against lucidrains' long-short-transformer."""

import importlib

import pytest
import torch

from cab import create_attention
from tests.attn_helpers import assert_appended_padding_changes_nothing, random_qkv

SMALL = dict(window_size=8, num_landmarks=4, chunk_size=6, chunk_rank=2)


@pytest.mark.parametrize("pattern", ["NS", "CS"])
@pytest.mark.parametrize("lq,lk,hparams", [
    (48, 48, SMALL),
    (37, 53, dict(window_size=5, chunk_size=4)),
    (20, 20, dict(window_size=1, chunk_size=1, dual_ln=False)),
])
def test_forward_matches_reference_with_gradients(pattern, lq, lk, hparams):
    torch.manual_seed(0)
    attn = create_attention("longshort", pattern, 4, 8, **hparams).double()
    q, k, v = random_qkv(2, 4, 2, lq, lk, 8)
    pad = torch.zeros(2, lk, dtype=torch.bool)
    pad[1, -7:] = True
    pad[1, 1:4] = True
    out, ref = attn(q, k, v, pad), attn.reference(q, k, v, pad)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    wrt = [q, k, v, *attn.parameters()]
    cot = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, wrt, cot), torch.autograd.grad(ref, wrt, cot)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("pattern", ["NS", "CS"])
def test_appended_padding_changes_nothing(pattern):
    attn = create_attention("longshort", pattern, 2, 8, **SMALL).double()
    q, k, v = (t.detach() for t in random_qkv(1, 2, 2, 45, 45, 8))
    assert_appended_padding_changes_nothing(attn, q, k, v, extra=10, rtol=1e-10, atol=1e-12)


def test_causal_rows_see_neither_later_keys_nor_later_segments():
    attn = create_attention("longshort", "CS", 2, 8, window_size=4, chunk_size=5).double()
    q, k, v = (t.detach() for t in random_qkv(1, 2, 2, 50, 50, 8))
    full = attn(q, k, v)
    for stop in (1, 5, 9, 10, 31, 49):
        torch.testing.assert_close(attn(q[:, :, :stop], k[:, :, :stop], v[:, :, :stop]), full[:, :, :stop])
    # far-away keys reach a row only through the compressed segments: removing them moves the output
    far = k.clone()
    far[:, :, :20] = torch.randn_like(far[:, :, :20])
    assert not torch.allclose(attn(q, far, v)[:, :, 40:], full[:, :, 40:])


@pytest.mark.parametrize("pattern", ["NS", "CS"])
def test_rows_that_see_no_key_are_zero(pattern):
    attn = create_attention("longshort", pattern, 2, 8, **SMALL).double()
    q, k, v = (t.detach() for t in random_qkv(2, 2, 2, 30, 30, 8))
    pad = torch.zeros(2, 30, dtype=torch.bool)
    pad[0] = True  # nothing to attend at all
    pad[1, :3] = True  # causal rows 0..2 see nothing
    out = attn(q, k, v, pad)
    assert out[0].abs().max() == 0
    if pattern == "CS":
        assert out[1, :, :3].abs().max() == 0
    torch.testing.assert_close(out, attn.reference(q, k, v, pad), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("length", [40, 37])
def test_causal_matches_lucidrains_long_short_transformer(length):
    """long-short-transformer==0.0.5 (lucidrains), causal: identity q/kv/out projections, no rotary
    embedding (a zero-angle stand-in), its tied keys = values, the same LayerNorms and projection (shared by
    the heads there), chunk_rank 1 (its causal mask supports only r = 1). Its noncausal window differs
    (three whole windows instead of the paper's segment +- w/2, which cab follows), so only CS is compared."""
    lucid = importlib.import_module("long_short_transformer.long_short_transformer")
    h, d, w, s = 2, 8, 8, 4
    inner = h * d

    class NoRotation(torch.nn.Module):
        def forward(self, seq, cache_key=None):
            return torch.zeros(seq.shape[0], d)

    theirs = lucid.LongShortAttention(dim=2 * inner, heads=h, dim_head=d, causal=True, window_size=w,
                                      segment_size=s, r=1, pos_emb=NoRotation()).double()
    ours = create_attention("longshort", "CS", h, d, window_size=w, chunk_size=s, chunk_rank=1).double()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        theirs.to_q.weight.zero_()
        theirs.to_q.weight[:, :inner] = torch.eye(inner)
        theirs.to_kv.weight.zero_()
        theirs.to_kv.weight[:, inner:] = torch.eye(inner)
        theirs.to_out.weight.zero_()
        theirs.to_out.weight[:inner] = torch.eye(inner)
        theirs.to_out.bias.zero_()
        for norm in (theirs.local_norm, theirs.global_norm):
            norm.weight.copy_(torch.rand(d, generator=gen, dtype=torch.float64) + 0.5)
            norm.bias.copy_(torch.randn(d, generator=gen, dtype=torch.float64))
        ours.proj_weight.copy_(theirs.to_dynamic_proj.weight.T.expand(h, d, 1))
        ours.ln_short.load_state_dict(theirs.local_norm.state_dict())
        ours.ln_long.load_state_dict(theirs.global_norm.state_dict())
        q = torch.randn(2, h, length, d, generator=gen, dtype=torch.float64)
        kv = torch.randn(2, h, length, d, generator=gen, dtype=torch.float64)
        x = torch.cat([t.transpose(1, 2).reshape(2, length, inner) for t in (q, kv)], dim=-1)
        expected = theirs(x)[..., :inner].reshape(2, length, h, d).transpose(1, 2)
        torch.testing.assert_close(ours(q, kv, kv), expected, rtol=1e-10, atol=1e-12)
