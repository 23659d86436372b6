"""mala (M12): forward vs reference (outputs and gradients), the released-code formula, rows summing to one,
sharpening with the query's magnitude, decoding, conformance."""

import pytest
import torch
import torch.nn.functional as F

from cab import create_attention
from tests.attn_helpers import SHAPES, assert_reference_agrees, random_qkv


@pytest.mark.parametrize("pattern,lq,lk", SHAPES)
def test_forward_matches_reference_with_gradients(pattern, lq, lk):
    attn = create_attention("mala", pattern, 4, 8, block_size=16)
    assert_reference_agrees(attn, lq, lk)


def test_matches_the_released_formula():
    """z = scale phi(q) mean phi(K); KV = scale phi(K)^T V / N; out = phi(q) KV (1 + 1/z) - z mean V."""
    attn = create_attention("mala", "NS", 2, 8)
    q, k, v = (t.detach() for t in random_qkv(2, 2, 2, 20, 20, 8))
    scale = 8 ** -0.5
    phi_q, phi_k = F.elu(q) + 1, F.elu(k) + 1
    z = phi_q @ phi_k.mean(dim=-2, keepdim=True).transpose(-1, -2) * scale
    kv = (phi_k.transpose(-1, -2) * (scale / 20) ** 0.5) @ (v * (scale / 20) ** 0.5)
    expected = phi_q @ kv * (1 + 1 / z) - z * v.mean(dim=-2, keepdim=True)
    torch.testing.assert_close(attn(q, k, v), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("pattern", ["NS", "CS"])
def test_rows_sum_to_one_and_sharpen_with_query_magnitude(pattern):
    attn = create_attention("mala", pattern, 1, 8)
    q, k, _ = (t.detach() for t in random_qkv(1, 1, 1, 12, 12, 8))
    eye = torch.eye(12, dtype=torch.float64).expand(1, 1, 12, 12)
    weights = attn(q, k, eye)  # values = identity: the output rows are the weight rows
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 1, 12, dtype=torch.float64))
    torch.testing.assert_close(weights, attn.reference(q, k, eye))
    q_big = q.abs() * 4  # larger phi(q) (ELU + 1 grows linearly for positive inputs)

    def spread(w):
        return (w.amax(-1) - w.amin(-1))[..., 4:]  # rows with several keys

    assert bool((spread(attn(q_big, k, eye)) > spread(attn(q.abs(), k, eye))).all())


@pytest.mark.parametrize("pattern,lq,lk", [("CS", 70, 70), ("CS", 30, 50), ("NS", 45, 45), ("CC", 50, 33)])
def test_sequence_chunking_matches_reference(pattern, lq, lk):
    attn = create_attention("mala", pattern, 4, 8, block_size=8)
    attn.seq_chunk = 16
    assert_reference_agrees(attn, lq, lk)
