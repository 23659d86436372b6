"""hedgehog (M11): forward vs reference (outputs and gradients, parameters included), the feature map, the
distillation loss (its definition, and that a few optimisation steps reduce it), decoding, conformance."""

import pytest
import torch

from cab import create_attention
from tests.attn_helpers import SHAPES, assert_reference_agrees, random_qkv


@pytest.mark.parametrize("pattern,lq,lk", SHAPES)
def test_forward_matches_reference_with_gradients(pattern, lq, lk):
    attn = create_attention("hedgehog", pattern, 4, 8, init_noise=0.3, seed=1).double()
    assert_reference_agrees(attn, lq, lk, params=attn.parameters())


def test_feature_map_is_identity_initialised_softmax_of_plus_minus():
    attn = create_attention("hedgehog", "NS", 2, 4).double()
    assert sum(p.numel() for p in attn.parameters()) == 2 * (2 * 4 * 4 + 2 * 4)
    x = torch.randn(1, 2, 3, 4, dtype=torch.float64)
    phi_q, phi_k = attn.features(x, x)
    torch.testing.assert_close(phi_q, torch.softmax(torch.cat([x, -x], dim=-1), dim=-1))
    torch.testing.assert_close(phi_k, phi_q)
    other = create_attention("hedgehog", "NS", 2, 4, init_noise=0.1, seed=3)
    same = create_attention("hedgehog", "NS", 2, 4, init_noise=0.1, seed=3)
    assert torch.equal(other.weight_q, same.weight_q) and not torch.equal(other.weight_q, other.weight_k)


def test_distillation_loss_is_the_cross_entropy_to_softmax():
    attn = create_attention("hedgehog", "CS", 2, 4).double()
    q, k, _ = (t.detach() for t in random_qkv(1, 2, 2, 6, 6, 4))
    loss = attn.distillation_loss(q, k)
    mask = torch.ones(6, 6, dtype=torch.bool).tril()
    teacher = torch.softmax((q @ k.transpose(-1, -2) / 2).masked_fill(~mask, float("-inf")), dim=-1)
    phi_q, phi_k = attn.features(q, k)
    student = (phi_q @ phi_k.transpose(-1, -2)) * mask
    student = student / student.sum(-1, keepdim=True)
    expected = -(teacher * torch.log(torch.where(mask, student, torch.ones_like(student)))).sum(-1).mean()
    torch.testing.assert_close(loss, expected)


def test_a_few_distillation_steps_reduce_the_loss():
    torch.manual_seed(0)
    attn = create_attention("hedgehog", "NS", 2, 8)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(4, 2, 32, 8, generator=gen) * 2
    k = torch.randn(4, 2, 32, 8, generator=gen) * 2
    pad = torch.zeros(4, 32, dtype=torch.bool)
    pad[1, -5:] = True
    losses = []
    for _ in range(20):  # plain gradient descent (torch.optim's first use imports much of dynamo: slow)
        loss = attn.distillation_loss(q, k, pad)
        grads = torch.autograd.grad(loss, list(attn.parameters()))
        with torch.no_grad():
            for param, grad in zip(attn.parameters(), grads):
                param -= 3.0 * grad
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.85 * losses[0] and all(b < a for a, b in zip(losses, losses[1:])), losses


@pytest.mark.parametrize("pattern", ["CS", "CC"])
def test_decode_matches_forward(pattern):
    attn = create_attention("hedgehog", pattern, 4, 8, init_noise=0.2).double()
    lk = 19 if pattern == "CS" else 11
    q, k, v = (t.detach() for t in random_qkv(2, 4, 2, 19, lk, 8))
    full = attn(q, k, v)
    prefill = 6 if pattern == "CS" else lk
    state = attn.decode_init(k[:, :, :prefill], v[:, :, :prefill])
    assert attn.decode_state_bytes(state) == 2 * 4 * 16 * (8 + 1) * 8  # (S, z), float64
    for t in range(prefill if pattern == "CS" else 0, 19):
        step = (k[:, :, t:t + 1], v[:, :, t:t + 1]) if pattern == "CS" else ()
        out, state = attn.decode_step(state, q[:, :, t:t + 1], *step)
        torch.testing.assert_close(out[:, :, 0], full[:, :, t], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("pattern,lq,lk", [("CS", 70, 70), ("CS", 30, 50), ("NS", 45, 45), ("CC", 50, 33)])
def test_sequence_chunking_matches_reference(pattern, lq, lk):
    """The sequence-level chunk loops (state carried across chunks in CS) agree with the dense reference."""
    attn = create_attention("hedgehog", pattern, 4, 8, init_noise=0.2).double()
    attn.block_size, attn.seq_chunk = 8, 16
    assert_reference_agrees(attn, lq, lk)
