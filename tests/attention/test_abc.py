"""abc: forward vs its row-by-row reference (outputs, input and parameter gradients), the causal path
against the noncausal one on prefixes, CAB's noncausal formula, seeded parameters, and conformance."""

import pytest
import torch

from cab import create_attention
from tests.attn_helpers import SHAPES, assert_forward_matches_reference, holey_padding, random_qkv

_inputs = random_qkv


def _build(pattern, heads=4, dim=8, **hparams):
    torch.manual_seed(0)
    return create_attention("abc", pattern, heads, dim, **hparams).double()


@pytest.mark.parametrize("pattern,lq,lk", SHAPES)
def test_forward_matches_reference_with_gradients(pattern, lq, lk):
    attn = _build(pattern, num_slots=5)
    q, k, v = _inputs(2, 4, 2, lq, lk, 8)
    assert_forward_matches_reference(attn, q, k, v, holey_padding(lk),
                                     wrt=(q, k, v, attn.control_k, attn.control_v))


def test_causal_rows_equal_noncausal_attention_on_their_prefix():
    """Row t of CS is NS attention of query t over keys 0..t (same parameters): the chunked cumulative
    path checked against the plain noncausal path, across chunk boundaries."""
    causal, full = _build("CS"), _build("NS")
    q, k, v = (t.detach() for t in _inputs(1, 4, 4, 140, 140, 8))
    out = causal(q, k, v)
    for t in (0, 1, 63, 64, 65, 100, 139):
        prefix = full(q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1])
        torch.testing.assert_close(out[:, :, t:t + 1], prefix, rtol=1e-10, atol=1e-12)


def test_noncausal_matches_cabs_formula():
    """CAB's ABC noncausal branch, transcribed: -inf on padded control logits, softmax over positions,
    compressed keys and values, softmax over slots."""
    attn = _build("NS", heads=2, num_slots=6)
    q, k, v = (t.detach() for t in _inputs(2, 2, 2, 30, 30, 8))
    pad = torch.zeros(2, 30, dtype=torch.bool)
    pad[1, 20:] = True
    mask = pad[:, None, None, :]
    k_probs = torch.softmax((k @ attn.control_k).transpose(-1, -2).masked_fill(mask, float("-inf")), dim=-1)
    v_probs = torch.softmax((v @ attn.control_v).transpose(-1, -2).masked_fill(mask, float("-inf")), dim=-1)
    probs = torch.softmax((q * 8**-0.5) @ (k_probs @ k).transpose(-1, -2), dim=-1)
    torch.testing.assert_close(attn(q, k, v, pad), probs @ (v_probs @ v))


def test_parameters_are_seeded_and_shared_by_heads():
    a, b = _build("NS", heads=3, num_slots=7), _build("NS", heads=3, num_slots=7)
    assert a.control_k.shape == a.control_v.shape == (8, 7)
    assert torch.equal(a.control_k, b.control_k) and torch.equal(a.control_v, b.control_v)
    assert not torch.equal(a.control_k, a.control_v)


def test_runs_in_float32_close_to_float64():
    torch.manual_seed(0)
    attn32 = create_attention("abc", "CS", 2, 8)
    attn64 = _build("CS", heads=2)
    q, k, v = (t.detach() for t in _inputs(1, 2, 2, 80, 80, 8))
    out32 = attn32(q.float(), k.float(), v.float())
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), attn64(q, k, v), rtol=1e-4, atol=1e-5)
