"""rala: forward vs its dense reference (outputs and gradients), the authors' layer expression (without its
RoPE and LePE), the gate, the causal patterns refused, conformance."""

import pytest
import torch
import torch.nn.functional as F

from cab import create_attention
from tests.attn_helpers import assert_reference_agrees, random_qkv


@pytest.mark.parametrize("pattern,lq,lk", [("NS", 37, 37), ("NC", 23, 41), ("NC", 41, 23)])
def test_forward_matches_reference_with_gradients(pattern, lq, lk):
    attn = create_attention("rala", pattern, 4, 8, seed=1)
    assert_reference_agrees(attn, lq, lk)


def test_matches_the_authors_expression():
    """RAVLT's linear layer: q, k = elu + 1; eff = softmax(scale q_mean k^T); k = k eff N;
    z = 1 / (q k_mean^T); kv = (k^T N^-1/2)(v N^-1/2); res = q kv z (RoPE and LePE left out)."""
    q, k, v = (t.detach() for t in random_qkv(2, 3, 3, 25, 25, 8))
    n, scale = 25, 8 ** -0.5
    qe, ke = F.elu(q) + 1, F.elu(k) + 1
    eff = torch.softmax(scale * qe.mean(dim=-2, keepdim=True) @ ke.transpose(-1, -2), dim=-1).transpose(-1, -2)
    ke = ke * eff * n
    z = 1 / (qe @ ke.mean(dim=-2, keepdim=True).transpose(-1, -2))
    kv = (ke.transpose(-1, -2) * n ** -0.5) @ (v * n ** -0.5)
    expected = qe @ kv * z
    out = create_attention("rala", "NS", 3, 8, gate=False)(q, k, v)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


def test_gate_is_a_projection_of_the_query_row():
    gated = create_attention("rala", "NS", 2, 8, seed=3)
    plain = create_attention("rala", "NS", 2, 8, gate=False)
    q, k, v = (t.detach() for t in random_qkv(1, 2, 2, 10, 10, 8))
    torch.testing.assert_close(
        gated(q, k, v), plain(q, k, v) * (q @ gated.gate.detach().double()), rtol=1e-12, atol=1e-14
    )
    assert sum(p.numel() for p in gated.parameters()) == 2 * 8 * 8
