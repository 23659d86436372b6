"""flowformer (M10): forward vs reference (outputs and gradients), agreement with the released Flow_Attention
and Flow_Attention_Causal equations, trailing padding, CC refused, conformance."""

import pytest
import torch

from cab import create_attention
from tests.attn_helpers import assert_reference_agrees, random_qkv

EPS = 1e-6


@pytest.mark.parametrize(
    "pattern,lq,lk", [("NS", 37, 37), ("CS", 70, 70), ("CS", 5, 12), ("CS", 12, 5), ("NC", 23, 41)]
)
def test_forward_matches_reference_with_gradients(pattern, lq, lk):
    attn = create_attention("flowformer", pattern, 4, 8, block_size=16)
    assert_reference_agrees(attn, lq, lk)


def _released_noncausal(q, k, v):
    """The equations of the authors' Flow_Attention (eps placement included), in their order."""
    q, k = torch.sigmoid(q), torch.sigmoid(k)
    sink_incoming = 1.0 / torch.einsum("nhld,nhd->nhl", q + EPS, k.sum(dim=2) + EPS)
    source_outgoing = 1.0 / torch.einsum("nhld,nhd->nhl", k + EPS, q.sum(dim=2) + EPS)
    conserved_sink = torch.einsum("nhld,nhd->nhl", q + EPS, (k * source_outgoing[..., None]).sum(dim=2) + EPS)
    conserved_source = torch.einsum("nhld,nhd->nhl", k + EPS, (q * sink_incoming[..., None]).sum(dim=2) + EPS)
    conserved_source = conserved_source.clamp(-1.0, 1.0)
    sink_allocation = torch.sigmoid(conserved_sink * (q.shape[2] / k.shape[2]))
    source_competition = torch.softmax(conserved_source, dim=-1) * k.shape[2]
    kv = k.transpose(-1, -2) @ (v * source_competition[..., None])
    return (q * sink_incoming[..., None]) @ kv * sink_allocation[..., None]


def _released_causal(q, k, v):
    """The equations of the authors' Flow_Attention_Causal."""
    q, k = torch.sigmoid(q), torch.sigmoid(k)
    sink_incoming = 1.0 / torch.einsum("nhld,nhld->nhl", q + EPS, k.cumsum(dim=2) + EPS)
    source_outgoing = 1.0 / torch.einsum("nhld,nhld->nhl", k + EPS, q.cumsum(dim=2) + EPS)
    normal = (torch.arange(q.shape[2], dtype=q.dtype) + 1.0)[None, None, :]
    sink_incoming, source_outgoing = sink_incoming * normal, source_outgoing * normal
    conserved_sink = torch.einsum("nhld,nhld->nhl", q + EPS,
                                  (k * source_outgoing[..., None]).cumsum(dim=2) + EPS) / normal
    conserved_source = torch.einsum("nhld,nhld->nhl", k + EPS,
                                    (q * sink_incoming[..., None]).cumsum(dim=2) + EPS) / normal
    conserved_source = conserved_source.clamp(-1.0, 1.0)
    sink_allocation = torch.sigmoid(conserved_sink)
    conserved_source = torch.exp(conserved_source)
    source_competition = conserved_source / conserved_source.cumsum(dim=-1) * normal
    qs = q * (sink_incoming / normal)[..., None]
    kv = torch.einsum("nhld,nhlm->nhldm", k, v * source_competition[..., None]).cumsum(dim=2)
    return torch.einsum("nhld,nhldm->nhlm", qs, kv) * sink_allocation[..., None]


@pytest.mark.parametrize("pattern,lq,lk", [("NS", 30, 30), ("NC", 17, 29), ("CS", 45, 45)])
def test_matches_the_released_equations(pattern, lq, lk):
    attn = create_attention("flowformer", pattern, 2, 8)
    q, k, v = (t.detach() for t in random_qkv(2, 2, 2, lq, lk, 8))
    expected = (_released_causal if pattern == "CS" else _released_noncausal)(q, k, v)
    torch.testing.assert_close(attn(q, k, v), expected, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("pattern", ["NS", "CS"])
def test_trailing_padding_changes_nothing(pattern):
    attn = create_attention("flowformer", pattern, 2, 8)
    q, k, v = (t.detach() for t in random_qkv(1, 2, 2, 25, 25, 8))
    extra = torch.randn(1, 2, 6, 8, dtype=torch.float64) * 10
    qp, kp, vp = (torch.cat([t, extra], dim=2) for t in (q, k, v))
    pad = torch.arange(31)[None] >= 25
    torch.testing.assert_close(attn(qp, kp, vp, pad)[:, :, :25], attn(q, k, v), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("pattern,lq,lk", [("CS", 70, 70), ("CS", 30, 50), ("NS", 45, 45), ("NC", 50, 33)])
def test_sequence_chunking_matches_reference(pattern, lq, lk):
    attn = create_attention("flowformer", pattern, 4, 8, block_size=8)
    attn.seq_chunk = 16
    assert_reference_agrees(attn, lq, lk)
