"""multi_token_attention (M57): blocked forward (halo rows, grouped conv2d) vs the per-row reference
(outputs and gradients, every pattern, odd and unequal lengths, holey padding, GQA); the identity kernel is
softmax attention; delta kernels shift the score map by one key or one query exactly as the formula says;
real rows ignore the garbage at left/interior padded positions (padded queries are absent rows of the conv);
conformance (causality of the conv under CS and CC included)."""

import pytest
import torch

from cab import create_attention
from tests.attn_helpers import assert_forward_matches_reference, holey_padding, random_qkv

SHAPES = [("NS", 21, 21), ("CS", 21, 21), ("CS", 7, 19), ("CS", 19, 7), ("NC", 9, 19), ("CC", 19, 9)]


@pytest.mark.parametrize("pattern,lq,lk", SHAPES)
def test_forward_matches_reference(pattern, lq, lk):
    attn = create_attention("multi_token_attention", pattern, 4, 8, chunk_size=8, query_kernel=3, key_kernel=5,
                            init_std=0.3).double()
    q, k, v = random_qkv(2, 4, 2, lq, lk, 8)
    assert_forward_matches_reference(attn, q, k, v, holey_padding(lk), wrt=(q, k, v, attn.kernel, attn.mixing))


@pytest.mark.parametrize("pattern", ["NS", "CS", "NC", "CC"])
def test_identity_kernel_is_softmax_attention(pattern):
    attn = create_attention("multi_token_attention", pattern, 4, 8, init_std=0.0, chunk_size=8).double()
    q, k, v = (t.detach() for t in random_qkv(2, 4, 4, 19, 19 if pattern == "CS" else 11, 8))
    pad = holey_padding(k.shape[-2])
    out, expected = attn(q, k, v, pad), create_attention("vanilla", pattern, 4, 8)(q, k, v, pad)
    if pattern == "CS":  # a padded position is a padded query, its score row zeroed: compare real rows
        real = ~pad[:, None, k.shape[-2] - q.shape[-2]:, None].expand_as(out)
        out, expected = out[real], expected[real]
    torch.testing.assert_close(out, expected)


def _delta(pattern, a, b, heads=2):
    attn = create_attention("multi_token_attention", pattern, heads, 8, query_kernel=3, key_kernel=5,
                            init_std=0.0).double()
    with torch.no_grad():
        attn.kernel.zero_()
        attn.kernel[:, 0, a, b] = 1.0
    return attn


def _softmax_attention(logits, v):
    return torch.softmax(logits, dim=-1) @ v


def test_key_delta_reads_the_next_keys_score():
    """A delta at key tap c_k//2 + 1: key j's logit is the score of key j + 1 (0 past the last key)."""
    q, k, v = (t.detach() for t in random_qkv(1, 2, 2, 6, 9, 8))
    scores = q @ k.transpose(-1, -2) / 8**0.5
    shifted = torch.cat([scores[..., 1:], torch.zeros_like(scores[..., :1])], dim=-1)
    torch.testing.assert_close(_delta("NC", 2, 3)(q, k, v), _softmax_attention(shifted, v))


def test_query_delta_reads_the_previous_querys_scores():
    """A delta at query tap c_q - 2: row i's logits are row i-1's scores (row 0: zeros, uniform weights);
    under CS the previous row's future key (key i) was zeroed before the conv."""
    q, k, v = (t.detach() for t in random_qkv(1, 2, 2, 7, 7, 8))
    scores = q @ k.transpose(-1, -2) / 8**0.5
    previous = torch.cat([torch.zeros_like(scores[..., :1, :]), scores[..., :-1, :]], dim=-2)
    torch.testing.assert_close(_delta("NS", 1, 2)(q, k, v), _softmax_attention(previous, v))
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    masked = previous.masked_fill(~causal.roll(1, dims=0).tril() & causal, 0.0).masked_fill(~causal, float("-inf"))
    torch.testing.assert_close(_delta("CS", 1, 2)(q, k, v), _softmax_attention(masked, v))


def test_head_mixing_combines_the_group_weights():
    """Mixing [[0, 1], [1, 0]] swaps the weights of the two heads of a group."""
    attn = create_attention("multi_token_attention", "NS", 2, 8, init_std=0.0).double()
    q, k, v = (t.detach() for t in random_qkv(1, 2, 2, 5, 5, 8))
    with torch.no_grad():
        attn.mixing.copy_(torch.tensor([[[0.0, 1.0], [1.0, 0.0]]]))
    weights = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1)
    torch.testing.assert_close(attn(q, k, v), weights.flip(1) @ v)


def _left_and_interior_padding(length=48):
    """Element 0: the first 8 positions padded; element 1: positions [9, 19)."""
    pad = torch.zeros(2, length, dtype=torch.bool)
    pad[0, :8] = True
    pad[1, 9:19] = True
    return pad


def _with_garbage(x, pad, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.where(pad[:, None, :, None], 10.0 * torch.randn(x.shape, generator=gen, dtype=x.dtype), x)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("pattern", ["NS", "CS"])
def test_real_rows_ignore_garbage_at_left_and_interior_padding(pattern, dtype):
    """Self patterns: a padded position is a padded query too, and its garbage q must not reach the later real
    rows through the query taps of the conv (right padding hid this: it follows every real row)."""
    attn = create_attention("multi_token_attention", pattern, 4, 32, chunk_size=16).to(dtype)
    q, k, v = (t.detach() for t in random_qkv(2, 4, 4, 48, 48, 32, dtype=dtype, seed=3))
    pad = _left_and_interior_padding()
    outs = [attn(*(_with_garbage(t, pad, seed + i) for i, t in enumerate((q, k, v))), pad) for seed in (10, 20)]
    real = ~pad[:, None, :, None].expand_as(outs[0])
    tol = 1e-12 if dtype is torch.float64 else 1e-5
    torch.testing.assert_close(outs[0][real], outs[1][real], rtol=tol, atol=tol)
    if dtype is torch.float64:  # the reference treats a padded query row the same way
        ref = attn.reference(*(_with_garbage(t, pad, 10 + i) for i, t in enumerate((q, k, v))), pad)
        torch.testing.assert_close(outs[0], ref, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("pattern", ["NS", "CS"])
def test_right_padding_leaves_the_real_rows_as_the_element_alone(pattern):
    attn = create_attention("multi_token_attention", pattern, 4, 16, chunk_size=8).double()
    q, k, v = (t.detach() for t in random_qkv(1, 4, 4, 30, 30, 16, seed=5))
    alone = attn(q[:, :, :23], k[:, :, :23], v[:, :, :23])
    pad = torch.zeros(1, 30, dtype=torch.bool)
    pad[0, 23:] = True
    padded = attn(*(_with_garbage(t, pad, 7 + i) for i, t in enumerate((q, k, v))), pad)
    torch.testing.assert_close(padded[:, :, :23], alone, rtol=1e-12, atol=1e-12)


def test_parameters_and_head_groups():
    attn = create_attention("multi_token_attention", "CS", 4, 8)
    assert sum(p.numel() for p in attn.parameters()) == 4 * 6 * 11 + 2 * 2 * 2
    with pytest.raises(ValueError, match="head_group"):
        create_attention("multi_token_attention", "CS", 3, 8)
