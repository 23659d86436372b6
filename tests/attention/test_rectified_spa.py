"""rectified_spa: forward vs its row-by-row reference (outputs and gradients, with and without the
rectification), the two exact limits (every block critical; one-token blocks, where pooling is exact),
pair counts, unsupported causal patterns, conformance."""

import pytest
import torch

from cab import create_attention
from tests.attn_helpers import (
    assert_is_exact_attention,
    assert_large_logits_finite,
    assert_padding_safe,
    assert_reference_agrees,
    exact_attention_case,
)

SMALL = {"block_size": 8, "topk": 2}


@pytest.mark.parametrize("rectify", [True, False])
@pytest.mark.parametrize("pattern,lq,lk", [("NS", 23, 23), ("NC", 27, 19), ("NC", 19, 27)])
def test_forward_matches_reference_with_gradients(pattern, lq, lk, rectify):
    attn = create_attention("rectified_spa", pattern, 4, 8, block_size=4, topk=2, rectify=rectify)
    assert_reference_agrees(attn, lq, lk)


@pytest.mark.parametrize("pattern", ["NS", "NC"])
def test_exact_limits(pattern):
    assert_is_exact_attention(create_attention("rectified_spa", pattern, 2, 8, block_size=4, topk=8), pattern)
    # one-token blocks: pooled attention is exact attention, so critical + rectified = exact for any topk
    # (padded self queries are left out of the query pool, so their rows differ; they are don't-care rows)
    q, k, v, pad, _, exact = exact_attention_case(pattern)
    lq = q.shape[-2]
    tokens = create_attention("rectified_spa", pattern, 2, 8, block_size=1, topk=3)
    rows = torch.ones(2, lq, dtype=torch.bool) if pattern == "NC" else ~pad
    torch.testing.assert_close(
        tokens(q, k, v, pad)[rows[:, None].expand(2, 2, lq)], exact[rows[:, None].expand(2, 2, lq)]
    )
    assert tokens.computed_pairs(q, k, v, pad) == 2 * 2 * lq * 3


@pytest.mark.parametrize("hparams", [{}, SMALL])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("pattern", ["NS", "NC"])
def test_padding_rows_without_keys_and_padded_gradients(pattern, dtype, hparams):
    """Regression (conformance key_padding, NS/NC): a batch element whose keys are all padded has no key block, so
    every pooled logit of its rows was -inf and the block softmax gave NaN outputs and gradients."""
    assert_padding_safe(create_attention("rectified_spa", pattern, 4, 32, **hparams), pattern, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pattern", ["NS", "NC"])
def test_large_logits_finite(pattern, dtype):
    """max |q.k| / sqrt(D) = 200: outputs and gradients stay finite (CS in float32 gave non-finite dq, dk)."""
    assert_large_logits_finite(create_attention("rectified_spa", pattern, 4, 32), dtype)
