"""local: forward vs its row-by-row reference, the window convention read off the gradients, padding
combined with the window and the sinks, conformance, and a cross-check against lucidrains' local-attention."""

import importlib

import pytest
import torch

from cab import create_attention
from tests.attn_helpers import random_qkv

_inputs = random_qkv


@pytest.mark.parametrize("pattern,lq,lk,window,sinks", [
    ("NS", 37, 37, 3, 0), ("NS", 40, 40, 15, 2), ("NS", 9, 9, 30, 20), ("NS", 7, 13, 2, 1), ("NS", 13, 7, 0, 1),
    ("CS", 50, 50, 4, 3), ("CS", 5, 17, 3, 2), ("CS", 17, 5, 2, 1), ("CS", 20, 20, 0, 0),
])
def test_forward_matches_reference_with_gradients(pattern, lq, lk, window, sinks):
    attn = create_attention("local", pattern, 4, 8, window=window, sinks=sinks)
    q, k, v = _inputs(2, 4, 2, lq, lk, 8)
    pad = torch.zeros(2, lk, dtype=torch.bool)
    pad[1, -3:] = True
    pad[0, 0] = True  # a padded sink
    pad[0, lk // 2] = True
    out, ref = attn(q, k, v, pad), attn.reference(q, k, v, pad)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    cot = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), cot), torch.autograd.grad(ref, (q, k, v), cot)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def _seen(attn, length, pad=None):
    """(Lq, Lk) bool: which keys each output row depends on, from the gradient of that row alone."""
    q, k, v = _inputs(1, 1, 1, length, length, 4)
    out = attn(q, k, v, pad)
    rows = []
    for i in range(length):
        (grad,) = torch.autograd.grad(out[0, 0, i].sum(), v, retain_graph=True)
        rows.append(grad[0, 0].abs().sum(-1) > 0)
    return torch.stack(rows)


def test_window_convention():
    """NS: |i - j| <= w (2w+1 keys); CS: i - w <= j <= i (w+1 keys including itself); sinks: the first s keys
    for every row (in CS only rows at or after them)."""
    i = torch.arange(12)[:, None]
    j = torch.arange(12)[None, :]
    assert torch.equal(_seen(create_attention("local", "NS", 1, 4, window=2), 12), (i - j).abs() <= 2)
    assert torch.equal(_seen(create_attention("local", "CS", 1, 4, window=2), 12), (i - j >= 0) & (i - j <= 2))
    sinks = (j < 2) & (j <= i)
    assert torch.equal(_seen(create_attention("local", "CS", 1, 4, window=2, sinks=2), 12),
                       ((i - j >= 0) & (i - j <= 2)) | sinks)


def test_padding_is_removed_from_window_and_sinks():
    """A padded key is never seen, inside the window or as a sink (CAB combined the masks wrongly); a row
    whose whole window is padded outputs 0."""
    pad = torch.zeros(1, 12, dtype=torch.bool)
    pad[0, [0, 5]] = True
    i = torch.arange(12)[:, None]
    j = torch.arange(12)[None, :]
    seen = _seen(create_attention("local", "NS", 1, 4, window=1, sinks=1), 12, pad)
    assert torch.equal(seen, ((i - j).abs() <= 1) & ~pad)
    q, k, v = (t.detach() for t in _inputs(1, 1, 1, 6, 6, 4))
    out = create_attention("local", "CS", 1, 4, window=1)(q, k, v, torch.tensor([[False, True, True] + [False] * 3]))
    assert torch.equal(out[0, 0, 2], torch.zeros(4, dtype=out.dtype))
    assert (out[0, 0, [0, 1, 3]].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("pattern,length,window", [("NS", 45, 4), ("NS", 64, 15), ("CS", 45, 4), ("CS", 50, 15)])
def test_matches_lucidrains_local_attention(pattern, length, window):
    """local-attention==1.11.2 (lucidrains): exact_windowsize=True with look_backward=1 (and look_forward=1
    noncausal) is the same window; no rotary embedding (dim not given); autopad for lengths the window
    does not divide, with a key mask (True = keep) so its zero-padded tail stays invisible."""
    lucid = importlib.import_module("local_attention")
    ref = lucid.LocalAttention(window_size=window, causal=pattern == "CS", autopad=True, exact_windowsize=True)
    attn = create_attention("local", pattern, 2, 8, window=window)
    q, k, v = (t.detach() for t in _inputs(2, 2, 2, length, length, 8))
    pad = torch.zeros(2, length, dtype=torch.bool)
    pad[1, [3, length - 2]] = True
    torch.testing.assert_close(attn(q, k, v, pad), ref(q, k, v, mask=~pad), rtol=1e-10, atol=1e-12)


# the block-sparse additions: FlexAttention backend, counts ------------------------------------------------

@pytest.mark.parametrize("pattern,lq,lk,window,sinks",
                         [("NS", 37, 37, 3, 2), ("CS", 40, 40, 4, 3), ("CS", 9, 21, 2, 1)])
def test_flex_backend_matches_torch_backend(pattern, lq, lk, window, sinks):
    """backend="flex" (float64: FlexAttention's unfused path, so no compilation) gives the torch path's outputs
    and, through its torch backward, the same gradients."""
    flex = create_attention("local", pattern, 4, 8, window=window, sinks=sinks, backend="flex")
    eager = create_attention("local", pattern, 4, 8, window=window, sinks=sinks)
    q, k, v = _inputs(2, 4, 2, lq, lk, 8)
    pad = torch.zeros(2, lk, dtype=torch.bool)
    pad[1, -3:] = True
    pad[0, 0] = True
    out, ref = flex(q, k, v, pad), eager(q, k, v, pad)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(ref.sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    assert flex.backend == "flex" and eager.backend == "torch"
    with pytest.raises(ValueError, match="backend"):
        create_attention("local", pattern, 4, 8, backend="cuda")


def test_computed_pairs_by_hand():
    """NS, L=40, w=15: query blocks of 16 rows score spans of 46 key rows starting at 16b - 15, cut to the 40
    real keys: 16*31 + 16*39 + 8*23 = 1304 pairs per (batch, head); sinks add s per real row."""
    q, k, v = (t.detach() for t in _inputs(2, 3, 3, 40, 40, 8))
    assert create_attention("local", "NS", 3, 8, window=15).computed_pairs(q, k, v) == 2 * 3 * 1304
    assert create_attention("local", "NS", 3, 8, window=15, sinks=2).computed_pairs(q, k, v) == 2 * 3 * (1304 + 80)
    exact_pairs = 2 * 3 * sum(min(39, i + 15) - max(0, i - 15) + 1 for i in range(40))
    flex = create_attention("local", "NS", 3, 8, window=15, backend="flex")
    assert flex.computed_pairs(q, k, v) == 2 * 3 * 40 * 40 >= exact_pairs  # one 128-block holds everything
    assert flex.algorithmic_flops(1, 40, 40, 3) is None
