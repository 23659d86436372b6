"""no_mixing, the negative control: forward against a rule written out element by element (own value in the
self patterns, mean of the real memory values in the cross patterns), with padding, grouped heads, Lq != Lk,
an all-padding row, half precision, and no gradient reaching queries or keys."""

from __future__ import annotations

import pytest
import torch

from cab import registry
from tests.attn_helpers import random_qkv


def rule(pattern: str, q, k, v, pad) -> torch.Tensor:
    """The control by hand: one output row at a time, in plain Python over batch, head and position."""
    b, hq, lq, _ = q.shape
    hkv, lk = k.shape[1], k.shape[-2]
    out = torch.zeros(b, hq, lq, v.shape[-1], dtype=torch.float64)
    for n in range(b):
        real = [j for j in range(lk) if pad is None or not bool(pad[n, j])]
        for h in range(hq):
            g = h // (hq // hkv)  # the key/value head this query head shares
            for i in range(lq):
                if pattern in ("NC", "CC"):
                    if real:
                        out[n, h, i] = sum(v[n, g, j].double() for j in real) / len(real)
                else:
                    own = i + lk - lq
                    if own >= 0 and own in real:
                        out[n, h, i] = v[n, g, own].double()
    return out


CASES = [  # pattern, lq, lk
    ("NS", 9, 9), ("CS", 9, 9), ("CS", 5, 9), ("CS", 9, 5), ("NC", 7, 11), ("NC", 11, 4), ("CC", 7, 11), ("CC", 12, 3),
]


@pytest.mark.parametrize("pattern,lq,lk", CASES, ids=[f"{p}-{a}x{b}" for p, a, b in CASES])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_forward_follows_the_rule(pattern, lq, lk, kv_heads):
    attn = registry.create_attention("no_mixing", pattern, 4, 6)
    q, k, v = (t.detach() for t in random_qkv(3, 4, kv_heads, lq, lk, 6, seed=lq + lk))
    pad = torch.zeros(3, lk, dtype=torch.bool)
    pad[0, 1] = True          # a hole
    pad[1, : lk // 2] = True  # left padding
    pad[2] = True             # all padding: every row sees no key
    out = attn(q, k, v, pad)
    expected = rule(pattern, q, k, v, pad)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=0)
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    torch.testing.assert_close(attn(q, k, v), rule(pattern, q, k, v, None), rtol=1e-12, atol=0)


def test_self_rows_are_their_own_values_and_cross_rows_the_mean():
    """The two facts the control rests on, stated directly: nothing moves between positions in NS, and in NC
    every query gets the same row whatever it is."""
    q, k, v = (t.detach() for t in random_qkv(2, 2, 2, 8, 8, 4))
    ns = registry.create_attention("no_mixing", "NS", 2, 4)
    assert torch.equal(ns(q, k, v), v)
    nc = registry.create_attention("no_mixing", "NC", 2, 4)
    out = nc(q, k, v)
    torch.testing.assert_close(out, v.mean(dim=-2, keepdim=True).expand_as(out))
    torch.testing.assert_close(nc(torch.randn_like(q), torch.randn_like(k), v), out, rtol=0, atol=0)


@pytest.mark.parametrize("pattern", ["NS", "CS", "NC", "CC"])
def test_gradients_reach_values_only_and_skip_padding(pattern):
    attn = registry.create_attention("no_mixing", pattern, 4, 6)
    q, k, v = random_qkv(2, 4, 2, 10, 10, 6)
    pad = torch.zeros(2, 10, dtype=torch.bool)
    pad[1, 3:6] = True
    out = attn(q, k, v, pad)
    gq, gk, gv = torch.autograd.grad(out, (q, k, v), torch.ones_like(out), allow_unused=True)
    assert gq is None and gk is None
    assert torch.equal(gv[1, :, 3:6], torch.zeros_like(gv[1, :, 3:6]))
    # each value is read by two query heads (GQA 4/2): in self patterns by its own row, in cross patterns by
    # all 10 rows with weight 1/10 (batch row 0) or 1/7 (batch row 1: 7 real keys)
    assert torch.allclose(gv[0], torch.full_like(gv[0], 2.0))
    real = 2.0 * 10 / 7 if pattern in ("NC", "CC") else 2.0
    assert torch.allclose(gv[1, :, :3], torch.full_like(gv[1, :, :3], real))


@pytest.mark.parametrize("pattern", ["CS", "NC"])
def test_half_precision_keeps_the_dtype_and_the_rule(pattern):
    attn = registry.create_attention("no_mixing", pattern, 2, 8)
    q, k, v = (t.detach().to(torch.bfloat16) for t in random_qkv(2, 2, 2, 16, 16, 8))
    out = attn(q, k, v)
    assert out.dtype is torch.bfloat16
    torch.testing.assert_close(out.double(), rule(pattern, q, k, v, None), rtol=1e-2, atol=1e-2)


def test_registered_as_the_control_family_on_every_pattern():
    spec = registry.get_spec("no_mixing")
    assert spec.family == "control" and not spec.exact
    assert [p.value for p in spec.patterns] == ["NS", "CS", "NC", "CC"]
