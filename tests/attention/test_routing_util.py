"""The gathered sparse softmax shared by the routing and retrieval attentions: its gathered path (N < Lk
slots per row) and its dense path (N >= Lk) both equal the row-by-row masked softmax, outputs, log-sum-exp
and gradients, including rows that select nothing and grouped queries."""

import pytest
import torch

from cab.attention.engine.routing import gathered_attention, selection_mask
from cab.attention.engine.scores import masked_softmax_reference


def _selection(b, h, g, gq, n, lk, seed):
    """Distinct random indices per row, some slots invalid, one group with no valid slot at all."""
    gen = torch.Generator().manual_seed(seed)
    spare = torch.randint(lk, (b * h * g, max(0, n - lk)), generator=gen)
    idx = torch.stack([torch.randperm(lk, generator=gen)[:n] for _ in range(b * h * g)])
    idx = torch.cat([idx, spare], dim=-1).reshape(b, h, g, n)
    # more slots than keys: the spare slots repeat indices, so they are invalid
    valid = (torch.arange(n) < lk).expand(b, h, g, gq, n).clone()
    valid &= torch.rand(b, h, g, gq, n, generator=gen) > 0.3
    valid[0, 0, 1] = False
    return idx, valid


@pytest.mark.parametrize("n", [5, 12, 16])  # gathered, dense (N == Lk), dense with spare invalid slots
@pytest.mark.parametrize("gq", [1, 3])
def test_gathered_attention_equals_the_masked_softmax(n, gq):
    b, h, g, lk, d = 2, 2, 4, 12, 8
    lq = g * gq
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(b, h, length, d, generator=gen, dtype=torch.float64, requires_grad=True)
               for length in (lq, lk, lk))
    idx, valid = _selection(b, h, g, gq, n, lk, seed=n + gq)
    out, lse = gathered_attention(q.reshape(b, h, g, gq, d), k, v, idx, valid, 0.3, return_lse=True)
    allowed = selection_mask(idx, valid, gq, lq, lk)
    expected = masked_softmax_reference(q, k, v, allowed, 0.3)
    torch.testing.assert_close(out.reshape(b, h, lq, d), expected, rtol=1e-10, atol=1e-12)
    scores = (q @ k.transpose(-1, -2) * 0.3).masked_fill(~allowed, float("-inf"))
    torch.testing.assert_close(lse.reshape(b, h, lq), torch.logsumexp(scores, dim=-1), rtol=1e-10, atol=1e-12)
    assert (out[0, 0, 1] == 0).all()  # the group that selected nothing outputs 0
    grads = torch.autograd.grad(out.reshape(b, h, lq, d).square().sum(), (q, k, v))
    want = torch.autograd.grad(expected.square().sum(), (q, k, v))
    for got, ref in zip(grads, want):
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-11)
