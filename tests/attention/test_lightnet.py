"""lightnet: forward vs its row-by-row reference (outputs and gradients), the fla-style logcumsumexp
recurrence as an independent check, order independence of the noncausal form, decoding, conformance."""

import pytest
import torch
import torch.nn.functional as F

from cab import create_attention
from tests.attn_helpers import SHAPES, assert_reference_agrees, random_qkv


@pytest.mark.parametrize("pattern,lq,lk", SHAPES)
def test_forward_matches_reference_with_gradients(pattern, lq, lk):
    attn = create_attention("lightnet", pattern, 4, 8)
    assert_reference_agrees(attn, lq, lk)


def test_matches_the_logcumsumexp_recurrence():
    """The recurrence as the fla layer states it: z_t = logcumsumexp(k), S_t = exp(z_{t-1} - z_t) S_{t-1}
    + exp(k_t - z_t) v_t^T, o_t = silu(q_t) S_t, stepped token by token."""
    q, k, v = (t.detach() for t in random_qkv(1, 2, 2, 30, 30, 6, seed=3))
    k = k * 3.0  # spiky keys
    z = torch.logcumsumexp(k, dim=-2)
    state = torch.zeros(1, 2, 6, 6, dtype=torch.float64)
    rows = []
    for t in range(30):
        decay = torch.exp(z[:, :, t - 1] - z[:, :, t]) if t else torch.zeros_like(z[:, :, 0])
        state = decay.unsqueeze(-1) * state + torch.exp(k[:, :, t] - z[:, :, t]).unsqueeze(-1) * v[:, :, t : t + 1]
        rows.append((F.silu(q[:, :, t : t + 1]) @ state).squeeze(-2))
    expected = torch.stack(rows, dim=-2)
    out = create_attention("lightnet", "CS", 2, 6)(q, k, v)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


def test_noncausal_is_order_independent():
    q, k, v = (t.detach() for t in random_qkv(1, 2, 2, 20, 20, 8))
    attn = create_attention("lightnet", "NS", 2, 8)
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(attn(q, k[:, :, perm], v[:, :, perm]), attn(q, k, v), rtol=1e-10, atol=1e-12)


def test_decode_matches_forward_and_state_is_constant_size():
    attn = create_attention("lightnet", "CS", 4, 8)
    q, k, v = (t.detach() for t in random_qkv(2, 4, 2, 40, 40, 8))
    pad = torch.zeros(2, 40, dtype=torch.bool)
    pad[1, :3] = True
    full = attn(q, k, v, pad)
    state = attn.decode_init(k[:, :, :10], v[:, :, :10], pad[:, :10])
    size = attn.decode_state_bytes(state)
    for t in range(10, 40):
        out, state = attn.decode_step(state, q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1])
        torch.testing.assert_close(out[:, :, 0], full[:, :, t], rtol=1e-9, atol=1e-11)
    assert attn.decode_state_bytes(state) == size == 8 * 2 * 4 * (8 * 8 + 8 + 8)


def test_float32_close_to_float64():
    attn = create_attention("lightnet", "CS", 2, 8)
    q, k, v = (t.detach() for t in random_qkv(1, 2, 2, 100, 100, 8))
    torch.testing.assert_close(attn(q.float(), k.float(), v.float()).double(), attn(q, k, v), rtol=1e-4, atol=1e-5)
