"""adaptive_filter_attention (M60): blocked forward (rotations factored per position) vs the per-row reference
that transports every key and value explicitly (outputs and gradients incl. all learned parameters, NS/CS,
unequal lengths, holey padding, GQA); the paper's limit (no decay, no process noise, Gaussian likelihood)
is rotary softmax attention; precision falls with distance; cross refused; conformance incl. decode."""

import pytest
import torch

from cab import create_attention
from cab.attention.adaptive_filter_attention import rotate
from tests.attn_helpers import assert_reference_agrees, random_qkv

NAME = "adaptive_filter_attention"


@pytest.mark.parametrize("pattern,lq,lk", [("NS", 17, 17), ("CS", 17, 17), ("CS", 7, 15), ("CS", 15, 7)])
def test_forward_matches_reference(pattern, lq, lk):
    attn = create_attention(NAME, pattern, 4, 8, chunk_size=8, decay=0.2, process_noise=0.3).double()
    params = (attn.raw_decay, attn.raw_process, attn.raw_measurement, attn.frequencies)
    assert_reference_agrees(attn, lq, lk, params=params)


def _limit(pattern, rotations: bool):
    """mu, sigma^2 -> 0, nu -> infinity, eta^2 = 1/2 (P = 1): logits q.Rk - |k|^2/2 + row constants."""
    attn = create_attention(NAME, pattern, 2, 8, dof=1e12, decay=1e-12, process_noise=1e-12,
                            measurement_noise=0.5).double()
    if not rotations:
        with torch.no_grad():
            attn.frequencies.zero_()
    return attn


@pytest.mark.parametrize("pattern", ["NS", "CS"])
def test_limit_without_rotations_is_softmax_attention(pattern):
    q, k, v = (t.detach() for t in random_qkv(1, 2, 2, 11, 11, 8))
    k = k / k.norm(dim=-1, keepdim=True)  # equal key norms: the -|k|^2/2 term is a constant
    expected = create_attention("vanilla", pattern, 2, 8)(q * 8**0.5, k, v)  # vanilla scales by 1/sqrt(8)
    torch.testing.assert_close(_limit(pattern, False)(q, k, v), expected, rtol=1e-6, atol=1e-8)


def test_limit_with_rotations_is_rotary_attention_with_transported_values():
    q, k, v = (t.detach() for t in random_qkv(1, 2, 2, 11, 11, 8))
    k = k / k.norm(dim=-1, keepdim=True)
    attn = _limit("CS", True)
    pos = torch.arange(11, dtype=torch.float64)
    angles = pos[:, None] * attn.frequencies.detach()[:, None, :]  # (H, L, D/2)
    qr, kr, vr = rotate(q, -angles), rotate(k, -angles), rotate(v, -angles)
    expected = rotate(create_attention("vanilla", "CS", 2, 8)(qr * 8**0.5, kr, vr), angles)
    torch.testing.assert_close(attn(q, k, v), expected, rtol=1e-6, atol=1e-8)


def test_far_tokens_get_less_weight_with_process_noise():
    """Identical keys at every position: only the propagated precision differs, so with decay and process
    noise the weight falls monotonically with the distance to the query (here the last row)."""
    attn = create_attention(NAME, "CS", 1, 4, decay=0.05, process_noise=1.0).double()
    with torch.no_grad():
        attn.frequencies.zero_()
    q = torch.ones(1, 1, 12, 4, dtype=torch.float64)
    eye = torch.eye(12, dtype=torch.float64)[None, None]
    out = attn(q, q.clone(), eye)[0, 0, -1]  # values one-hot: the output is the (decayed) weights
    assert (out[1:] > out[:-1]).all()
