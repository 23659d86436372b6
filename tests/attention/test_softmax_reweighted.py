"""selective_attention (M54), cog_attention (M55), affine_scaled_attention (M56): blocked forward vs the
per-row reference (outputs and gradients, every pattern, odd and unequal lengths, holey padding, GQA),
the formulas on a tiny example computed by hand with `math`, the softmax limit of the gated variants,
their parameters, and conformance."""

import math

import pytest
import torch

from cab import create_attention
from tests.attn_helpers import assert_reference_agrees, holey_padding, random_qkv

NAMES = ["selective_attention", "cog_attention", "affine_scaled_attention"]
SHAPES = [("NS", 21, 21), ("CS", 21, 21), ("CS", 7, 19), ("CS", 19, 7), ("NC", 9, 19), ("CC", 19, 9)]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("pattern,lq,lk", SHAPES)
def test_forward_matches_reference(name, pattern, lq, lk):
    attn = create_attention(name, pattern, 4, 8, chunk_size=8).double()
    assert_reference_agrees(attn, lq, lk)


@pytest.mark.parametrize("name", ["selective_attention", "affine_scaled_attention"])
def test_gradients_reach_the_parameters(name):
    attn = create_attention(name, "CS", 2, 8).double()
    q, k, v = random_qkv(1, 2, 2, 9, 9, 8)
    attn(q, k, v).square().sum().backward()
    for pname, p in attn.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


# one query, three keys, d = 2: scores s = q.k / sqrt(2) = (2, -1, 0.5) / sqrt(2)
_Q = [[1.0, 0.0]]
_K = [[2.0, 0.0], [-1.0, 3.0], [0.5, -1.0]]
_V = [[1.0, 2.0], [3.0, -1.0], [-2.0, 0.5]]
_S = [2 / math.sqrt(2), -1 / math.sqrt(2), 0.5 / math.sqrt(2)]


def _t(rows):
    return torch.tensor(rows, dtype=torch.float64)[None, None]


def _combine(weights):
    return torch.tensor([sum(w * v[c] for w, v in zip(weights, _V)) for c in range(2)], dtype=torch.float64)


def _softmax(xs):
    e = [math.exp(x) for x in xs]
    return [x / sum(e) for x in e]


def _zeroed(attn):
    with torch.no_grad():
        for p in attn.parameters():
            p.zero_()
    return attn


def test_cog_by_hand():
    mags = _softmax([abs(s) for s in _S])
    expected = [math.copysign(m, s) for m, s in zip(mags, _S)]
    out = create_attention("cog_attention", "NS", 1, 2)(_t(_Q), _t(_K), _t(_V))[0, 0, 0]
    torch.testing.assert_close(out, _combine(expected))


def test_selective_temperature_by_hand():
    """u = c = 0, alpha = 0.3, no value gate: softmax((1 + 0.3 log 3) s)."""
    attn = _zeroed(create_attention("selective_attention", "NS", 1, 2, value_temperature=False).double())
    with torch.no_grad():
        attn.position_scale.fill_(0.3)
    out = attn(_t(_Q), _t(_K), _t(_V))[0, 0, 0]
    torch.testing.assert_close(out, _combine(_softmax([(1 + 0.3 * math.log(3)) * s for s in _S])))


def test_selective_gates_by_hand():
    """Every gate on, causal self (n_i = i + 1): tau_i = (1 + tanh(u . q_i / sqrt(2) + c)) (1 + alpha log n_i),
    v~_j = (1 + tanh(r . v_j / sqrt(2))) v_j, out_i = sum_{j <= i} softmax_j(tau_i s_ij) v~_j, with `math`."""
    queries = [[1.0, 0.0], [0.5, -1.0], [-0.3, 0.8]]
    u, c, alpha, r = [0.5, -1.0], 0.2, 0.3, [1.0, 0.5]
    attn = create_attention("selective_attention", "CS", 1, 2).double()
    with torch.no_grad():
        attn.query_gate.copy_(torch.tensor([u]))
        attn.query_bias.fill_(c)
        attn.position_scale.fill_(alpha)
        attn.value_gate.copy_(torch.tensor([r]))

    def dot(a, b):
        return sum(x * y for x, y in zip(a, b))

    gated = [[(1 + math.tanh(dot(r, v) / math.sqrt(2))) * x for x in v] for v in _V]
    expected = []
    for i, q in enumerate(queries):
        tau = (1 + math.tanh(dot(u, q) / math.sqrt(2) + c)) * (1 + alpha * math.log(i + 1))
        w = _softmax([tau * dot(q, k) / math.sqrt(2) for k in _K[:i + 1]])
        expected.append([sum(wj * g[col] for wj, g in zip(w, gated)) for col in range(2)])
    out = attn(_t(queries), _t(_K), _t(_V))[0, 0]
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64))


def test_affine_by_hand():
    """Gates zero, f = 0.7: alpha = 2 sigmoid(0) = 1, beta = tanh(0.7): w = softmax(s) + tanh(0.7) / 3."""
    attn = _zeroed(create_attention("affine_scaled_attention", "NS", 1, 2).double())
    with torch.no_grad():
        attn.bias_bias.fill_(0.7)
    out = attn(_t(_Q), _t(_K), _t(_V))[0, 0, 0]
    torch.testing.assert_close(out, _combine([w + math.tanh(0.7) / 3 for w in _softmax(_S)]))


@pytest.mark.parametrize("name", ["selective_attention", "affine_scaled_attention"])
@pytest.mark.parametrize("pattern", ["CS", "NC"])
def test_zero_parameters_give_softmax_attention(name, pattern):
    attn = _zeroed(create_attention(name, pattern, 2, 8).double())
    vanilla = create_attention("vanilla", pattern, 2, 8)
    q, k, v = (t.detach() for t in random_qkv(2, 2, 2, 17, 17 if pattern == "CS" else 9, 8))
    pad = holey_padding(k.shape[-2])
    torch.testing.assert_close(attn(q, k, v, pad), vanilla(q, k, v, pad))


def test_parameter_counts():
    h, d = 4, 16
    assert sum(p.numel() for p in create_attention("selective_attention", "NS", h, d).parameters()) == h * (2 * d + 2)
    assert sum(
        p.numel() for p in create_attention("affine_scaled_attention", "NS", h, d).parameters()
    ) == h * (2 * d + 2)
    assert not list(create_attention("cog_attention", "NS", h, d).parameters())


def test_seed_fixes_the_initialisation():
    a, b, c = (create_attention("selective_attention", "NS", 2, 8, seed=s) for s in (0, 0, 1))
    assert torch.equal(a.query_gate, b.query_gate) and not torch.equal(a.query_gate, c.query_gate)
