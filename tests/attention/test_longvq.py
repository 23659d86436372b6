"""longvq (LongVQ vector-quantized attention, M25): forward vs reference (outputs, gradients of q, v and the
codebook), exact softmax attention when every key is a codeword, nearest-codeword assignment, decoding,
conformance."""

import pytest
import torch

from cab import create_attention
from tests.attn_helpers import (
    SHAPES_CHUNKED,
    assert_forward_matches_reference,
    assert_unpadded_decode_matches_forward,
    holey_padding,
    random_qkv,
)


@pytest.mark.parametrize("pattern,lq,lk", SHAPES_CHUNKED)
def test_forward_matches_reference_with_gradients(pattern, lq, lk):
    attn = create_attention("longvq", pattern, 4, 8, num_codes=6, chunk_size=5, seed=1).double()
    q, k, v = random_qkv(2, 4, 2, lq, lk, 8)
    assert_forward_matches_reference(attn, q, k, v, holey_padding(lk), wrt=(q, v, attn.codebook))


@pytest.mark.parametrize("pattern", ["NS", "CS", "NC", "CC"])
def test_is_exact_softmax_attention_when_the_keys_are_codewords(pattern):
    """Independent of the factorisation: with the codebook holding every key (one batch row, one
    key/value head per query head), quantization is the identity and LongVQ is vanilla attention."""
    lq, lk = (11, 11) if pattern in ("NS", "CS") else (7, 13)
    q, k, v = (t.detach() for t in random_qkv(1, 2, 2, lq, lk, 8, seed=2))
    attn = create_attention("longvq", pattern, 2, 8, num_codes=lk, chunk_size=4).double()
    with torch.no_grad():
        attn.codebook.copy_(k[0])
    exact = create_attention("vanilla", pattern, 2, 8)
    torch.testing.assert_close(attn(q, k, v), exact(q, k, v), rtol=1e-10, atol=1e-12)


def test_assignment_is_the_nearest_codeword():
    attn = create_attention("longvq", "NS", 2, 8, num_codes=10).double()
    k = torch.randn(3, 2, 17, 8, dtype=torch.float64)
    dist = torch.cdist(k, attn.codebook.detach()[None].expand(3, -1, -1, -1))
    assert torch.equal(attn.assign(k), dist.argmin(dim=-1))


@pytest.mark.parametrize("pattern", ["CS", "CC"])
def test_decode_matches_forward(pattern):
    attn = create_attention("longvq", pattern, 4, 8, num_codes=5, chunk_size=4).double()
    state = assert_unpadded_decode_matches_forward(attn, pattern)
    assert attn.decode_state_bytes(state) == 2 * 4 * 5 * (8 + 1) * 8  # (U, n) per head and codeword
