"""Public kernels as comparison rows (fla_chunk_linear, fla_fused_recurrent): declared unavailable with the
reason where fla or CUDA is missing (conformance then reports them unsupported, cleanly); the wrapper's
layout and normaliser checked against the reference with a stand-in for the fla operator that follows fla's
documented calling convention ([B, T, H, D] tensors, scale, normalize); the real operators on CUDA."""

import importlib.util

import pytest
import torch

from cab import create_attention
from cab.attention import public_kernels
from cab.check import run_conformance
from cab.status import Status
from tests.attn_helpers import assert_forward_matches_reference, holey_padding, random_qkv

NAMES = ["fla_chunk_linear", "fla_fused_recurrent"]


@pytest.mark.parametrize("name", NAMES)
def test_unavailable_on_cpu_with_a_reason(name):
    cls = type(create_attention(name, "CS", 2, 8))
    reason = cls.unavailable_reason("cpu")
    assert reason and ("not installed" in reason or "CUDA" in reason)


@pytest.mark.parametrize("name", NAMES)
def test_conformance_is_clean_where_unavailable(name):
    for pattern in ("CS", "NS"):
        report = run_conformance(name, pattern)
        assert report.status is Status.UNSUPPORTED, report.message


def _fake_fla(q, k, v, scale=None, initial_state=None, output_final_state=False, normalize=True):
    """Stand-in with fla's convention: [B, T, H, D] inputs, o_t = scale * sum_{j<=t} (q_t.k_j) v_j."""
    assert not normalize
    weights = torch.einsum("bthd,bshd->bhts", q, k).tril() * scale
    return torch.einsum("bhts,bshd->bthd", weights, v), None


@pytest.mark.parametrize("lq,lk", [(23, 23), (15, 29), (29, 15)])
def test_wrapper_layout_and_normaliser(monkeypatch, lq, lk):
    monkeypatch.setattr(public_kernels, "fla_operator", lambda kind: _fake_fla)
    monkeypatch.setattr(public_kernels._FlaLinear, "unavailable_reason", classmethod(lambda cls, device: None))
    attn = create_attention("fla_chunk_linear", "CS", 4, 8)
    q, k, v = random_qkv(2, 4, 2, lq, lk, 8)
    assert_forward_matches_reference(attn, q, k, v, holey_padding(lk))
    # and it is linear_elu's math
    torch.testing.assert_close(attn.reference(q, k, v), create_attention("linear_elu", "CS", 4, 8).reference(q, k, v))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("fla") is None,
                    reason="needs CUDA and flash-linear-attention")
@pytest.mark.parametrize("name", NAMES)
def test_real_operators_on_cuda(name):
    report = run_conformance(name, "CS", device="cuda")
    assert report.status is Status.OK, report.message
