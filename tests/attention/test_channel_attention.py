"""davit_channel (DaViT channel attention, M27): forward vs reference in every pattern (odd lengths, Lq != Lk,
GQA, holey padding, chunks smaller than L), the released code's formula, decoding, conformance."""

import pytest
import torch

from cab import create_attention
from tests.attn_helpers import (
    SHAPES_CHUNKED,
    assert_reference_agrees,
    assert_unpadded_decode_matches_forward,
    random_qkv,
)


@pytest.mark.parametrize("pattern,lq,lk", SHAPES_CHUNKED)
def test_forward_matches_reference_with_gradients(pattern, lq, lk):
    attn = create_attention("davit_channel", pattern, 4, 8, chunk_size=5)
    assert_reference_agrees(attn, lq, lk)


def test_noncausal_equals_the_released_code_formula():
    """DaViT's ChannelAttention.forward on one head: k * scale; A = softmax(k^T v); x = (A q^T)^T."""
    q, k, v = (t.detach() for t in random_qkv(2, 3, 3, 29, 29, 16, seed=4))
    out = create_attention("davit_channel", "NS", 3, 16)(q, k, v)
    attention = torch.softmax((k * 16 ** -0.5).transpose(-1, -2) @ v, dim=-1)
    torch.testing.assert_close(out, (attention @ q.transpose(-1, -2)).transpose(-1, -2), rtol=1e-12, atol=1e-12)


def test_causal_prefix_rows_use_only_earlier_tokens_and_the_last_row_is_noncausal():
    q, k, v = (t.detach() for t in random_qkv(1, 2, 2, 17, 17, 8, seed=5))
    cs = create_attention("davit_channel", "CS", 2, 8, chunk_size=4)(q, k, v)
    ns = create_attention("davit_channel", "NS", 2, 8)
    torch.testing.assert_close(cs[:, :, -1], ns(q, k, v)[:, :, -1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cs[:, :, 6], ns(q[:, :, :7], k[:, :, :7], v[:, :, :7])[:, :, 6], rtol=1e-12, atol=1e-12)


def test_all_padded_rows_are_zero():
    q, k, v = (t.detach() for t in random_qkv(2, 2, 2, 5, 6, 8))
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[0] = True
    for pattern in ("NC", "CC"):
        out = create_attention("davit_channel", pattern, 2, 8)(q, k, v, pad)
        assert torch.all(out[0] == 0) and torch.all(out[1] != 0)


@pytest.mark.parametrize("pattern", ["CS", "CC"])
def test_decode_matches_forward(pattern):
    attn = create_attention("davit_channel", pattern, 4, 8, chunk_size=3)
    state = assert_unpadded_decode_matches_forward(attn, pattern)
    assert attn.decode_state_bytes(state) == 2 * 4 * 8 * 8 * 8 + 2 * 8  # d x d per head, float64; counts
