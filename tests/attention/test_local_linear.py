"""local_linear (Local Linear Attention, M26): the blockwise moment form vs the per-row weighted least-squares
reference (outputs and gradients), its two limits (huge ridge -> softmax attention; values linear in the keys
are reproduced as ridge -> 0), decoding, conformance."""

import pytest
import torch

from cab import create_attention
from tests.attn_helpers import (
    SHAPES_CHUNKED,
    assert_large_logits_finite,
    assert_padding_safe,
    assert_reference_agrees,
    random_qkv,
)

SMALL = {"query_chunk_size": 8, "key_chunk_size": 6}


@pytest.mark.parametrize("pattern,lq,lk", SHAPES_CHUNKED)
def test_forward_matches_reference_with_gradients(pattern, lq, lk):
    attn = create_attention("local_linear", pattern, 4, 8, **SMALL)
    assert_reference_agrees(attn, lq, lk)


@pytest.mark.parametrize("pattern", ["NS", "CS", "NC"])
def test_huge_ridge_is_softmax_attention(pattern):
    """The slope is shrunk to 0: the local constant fit, i.e. softmax attention."""
    q, k, v = (t.detach() for t in random_qkv(2, 2, 2, 13, 13 if pattern != "NC" else 17, 8, seed=1))
    lla = create_attention("local_linear", pattern, 2, 8, ridge=1e12, **SMALL)
    torch.testing.assert_close(lla(q, k, v), create_attention("vanilla", pattern, 2, 8)(q, k, v), rtol=1e-8, atol=1e-9)


def test_values_linear_in_the_keys_are_reproduced_at_the_query():
    """v = A k + c exactly: the local linear fit is exact, so the output is A q + c for every query (softmax
    attention, a local average, is not)."""
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 2, 9, 4, generator=gen, dtype=torch.float64)
    k = torch.randn(1, 2, 40, 4, generator=gen, dtype=torch.float64)
    a, c = (
        torch.randn(2, 4, 4, generator=gen, dtype=torch.float64),
        torch.randn(2, 4, generator=gen, dtype=torch.float64),
    )
    v = (k @ a.transpose(-1, -2)[None]) + c[None, :, None]
    want = (q @ a.transpose(-1, -2)[None]) + c[None, :, None]
    out = create_attention("local_linear", "NC", 2, 4, ridge=1e-12, **SMALL)(q, k, v)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    assert (create_attention("vanilla", "NC", 2, 4)(q, k, v) - want).abs().max() > 0.1


# chunks that the padding of padded_garbage_inputs crosses (keys 9..18 span the boundary at 12) at a quarter
# of SMALL's chunk pairs (12 instead of 48; its backward took 5-15 s per case)
PADDING_CHUNKS = {"query_chunk_size": 16, "key_chunk_size": 12}


@pytest.mark.parametrize("hparams", [{}, PADDING_CHUNKS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("pattern", ["NS", "CS", "NC", "CC"])
def test_padding_rows_without_keys_and_padded_gradients(pattern, dtype, hparams):
    """Regression (conformance key_padding[float32], NS/CS): the second pass took exp of unmasked scores and masked
    afterwards, so a padded key's garbage score above the row lse overflowed and 0 * inf = NaN reached dq, dk."""
    assert_padding_safe(create_attention("local_linear", pattern, 4, 32, **hparams), pattern, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pattern", ["NS", "CS", "NC", "CC"])
def test_large_logits_finite(pattern, dtype):
    """max |q.k| / sqrt(D) = 200: outputs and gradients stay finite (CS in float32 gave non-finite dq, dk)."""
    assert_large_logits_finite(create_attention("local_linear", pattern, 4, 32), dtype)
