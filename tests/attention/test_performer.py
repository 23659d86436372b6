"""performer: forward vs its naive reference, features, seeds, convergence to softmax, conformance, and
cross-checks against performer-pytorch's kernels."""

import importlib

import pytest
import torch

from cab import create_attention
from tests.attn_helpers import SHAPES, assert_forward_matches_reference, holey_padding


def _inputs(b, hq, hkv, lq, lk, d, dtype=torch.float64, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=gen, dtype=dtype) * scale
    k = torch.randn(b, hkv, lk, d, generator=gen, dtype=dtype) * scale
    v = torch.randn(b, hkv, lk, d, generator=gen, dtype=dtype)
    return [t.requires_grad_() for t in (q, k, v)]


@pytest.mark.parametrize("pattern,lq,lk", SHAPES)
def test_forward_matches_reference_with_gradients(pattern, lq, lk):
    attn = create_attention("performer", pattern, 4, 8, num_features=12, seed=1)
    q, k, v = _inputs(2, 4, 2, lq, lk, 8)
    assert_forward_matches_reference(attn, q, k, v, holey_padding(lk))


def test_features_are_block_orthogonal_and_seeded():
    d, m = 8, 20
    attn = create_attention("performer", "NS", 2, d, num_features=m, seed=5)
    omega = attn.omega.double()
    assert omega.shape == (2, m, d)
    for block in (omega[0, :d], omega[0, d:2 * d], omega[1, :d]):
        gram = block @ block.T
        torch.testing.assert_close(gram, torch.diag(torch.diagonal(gram)), atol=1e-5, rtol=0)
    same = create_attention("performer", "NS", 2, d, num_features=m, seed=5)
    other = create_attention("performer", "NS", 2, d, num_features=m, seed=6)
    assert torch.equal(same.omega, attn.omega)
    assert not torch.allclose(other.omega, attn.omega)
    assert not torch.allclose(attn.omega[0], attn.omega[1])  # each head has its own features


def test_approaches_softmax_attention_as_features_grow():
    """An independent check of the estimator: with many features it gets close to exact softmax attention
    (small-norm inputs keep the positive-feature variance low); 16 features are visibly worse."""
    q, k, v = (t.detach() for t in _inputs(1, 2, 2, 16, 16, 16, scale=0.5))
    for pattern in ("NS", "CS"):
        exact = create_attention("vanilla", pattern, 2, 16)(q, k, v)
        errors = {}
        for m in (16, 4096):
            out = create_attention("performer", pattern, 2, 16, num_features=m, seed=0)(q, k, v)
            errors[m] = float((out - exact).norm() / exact.norm())
        assert errors[4096] < 0.1 and errors[4096] < errors[16] / 2, errors


def test_runs_in_float32_close_to_float64():
    attn = create_attention("performer", "CS", 2, 8)
    q, k, v = (t.detach() for t in _inputs(1, 2, 2, 40, 40, 8))
    out32 = attn(q.float(), k.float(), v.float())
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), attn(q, k, v), rtol=1e-4, atol=1e-5)


def _per_head(attn, q, k, v, fn):
    return torch.cat([fn(attn.omega[h].double(), q[:, h:h + 1], k[:, h:h + 1], v[:, h:h + 1])
                      for h in range(q.shape[1])], dim=1)


@pytest.mark.parametrize("pattern", ["NS", "CS"])
def test_matches_performer_pytorch_kernels(pattern):
    """performer-pytorch==1.1.4 with cab's projection matrix per head: its softmax_kernel feature map and its
    linear_attention / causal_linear_attention_noncuda products, with eps=0 (see the next test for eps)."""
    pp = importlib.import_module("performer_pytorch.performer_pytorch")
    attn = create_attention("performer", pattern, 3, 16, num_features=24, seed=2)
    q, k, v = (t.detach() for t in _inputs(2, 3, 3, 50, 50, 16))

    def theirs(omega, qh, kh, vh):
        phi_q = pp.softmax_kernel(qh, projection_matrix=omega, is_query=True, eps=0.0)
        phi_k = pp.softmax_kernel(kh, projection_matrix=omega, is_query=False, eps=0.0)
        if pattern == "NS":
            return pp.linear_attention(phi_q, phi_k, vh)
        return pp.causal_linear_attention_noncuda(phi_q, phi_k, vh, eps=0.0)

    torch.testing.assert_close(attn(q, k, v), _per_head(attn, q, k, v, theirs), rtol=1e-9, atol=1e-11)


def test_stock_performer_pytorch_differs_by_its_epsilon_and_leaks_the_future_causally():
    """Deliberate difference: performer-pytorch adds eps=1e-4 to every feature after shifting the keys by
    their maximum over the whole sequence, so its causal output at row 0 moves when a later key grows;
    cab adds no epsilon (the shifts cancel exactly) and row 0 does not move."""
    pp = importlib.import_module("performer_pytorch")
    attn = create_attention("performer", "CS", 1, 16, num_features=24, seed=2)
    stock = pp.FastAttention(16, nb_features=24, causal=True).double()
    stock.projection_matrix.copy_(attn.omega[0])
    q, k, v = (t.detach() for t in _inputs(1, 1, 1, 20, 20, 16))
    k_later = k.clone()
    k_later[..., 15, :] *= 4.0
    assert not torch.allclose(stock(q, k, v)[..., 0, :], stock(q, k_later, v)[..., 0, :], rtol=1e-6, atol=0)
    torch.testing.assert_close(attn(q, k, v)[..., 0, :], attn(q, k_later, v)[..., 0, :], rtol=1e-12, atol=0)
