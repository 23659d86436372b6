"""lightning (M8, M9): forward vs the dense reference (outputs and gradients), the tiled Lightning-2 backward
vs autograd through the block loop, what the autograd Function keeps, TNL's decay slopes, decoding, and
conformance."""

import pytest
import torch

from cab import create_attention
from cab.attention.lightning import lightning_attention_torch, tnl_slopes
from tests.attn_helpers import SHAPES, assert_reference_agrees, random_qkv


@pytest.mark.parametrize("pattern,lq,lk", SHAPES)
def test_forward_matches_reference_with_gradients(pattern, lq, lk):
    attn = create_attention("lightning", pattern, 4, 8, block_size=16, tiled_backward=(lq != 5))
    assert_reference_agrees(attn, lq, lk)


def _dense(q, k, v, decay):
    i = torch.arange(q.shape[-2], dtype=q.dtype)
    diff = i[:, None] - i[None, :]
    weights = torch.where(diff >= 0, decay.reshape(-1, 1, 1) ** diff.clamp(min=0), torch.zeros((), dtype=q.dtype))
    return ((q @ k.transpose(-1, -2)) * weights) @ v


@pytest.mark.parametrize("length,block", [(1, 4), (29, 8), (40, 16)])
def test_tiled_backward_matches_autograd_and_keeps_only_inputs(length, block):
    q, k, v = random_qkv(2, 3, 3, length, length, 5)
    decay = torch.tensor([0.5, 0.93, 1.0], dtype=torch.float64)
    out, _ = lightning_attention_torch(q, k, v, decay, block_size=block)
    torch.testing.assert_close(out, _dense(q, k, v, decay), rtol=1e-10, atol=1e-12)
    # the Function saved q, k, v, the decay and the (zero) initial state, nothing per block
    saved = out.grad_fn.saved_tensors
    assert len(saved) == 5 and sum(t.numel() for t in saved) == 3 * q.numel() + 3 + 2 * 3 * 5 * 5
    cot = torch.randn_like(out)
    tiled = torch.autograd.grad(out, (q, k, v), cot)
    loop = torch.autograd.grad(
        lightning_attention_torch(q, k, v, decay, block, tiled_backward=False)[0], (q, k, v), cot
    )
    dense = torch.autograd.grad(_dense(q, k, v, decay), (q, k, v), cot)
    for a, b, c in zip(tiled, loop, dense):
        torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(b, c, rtol=1e-9, atol=1e-11)


def test_tiled_function_passes_gradcheck():
    q, k, v = random_qkv(1, 2, 2, 11, 11, 3)
    decay = torch.tensor([0.7, 0.95], dtype=torch.float64)
    state = torch.randn(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)  # through the state too
    assert torch.autograd.gradcheck(
        lambda a, b, c, s: lightning_attention_torch(a, b, c, decay, 4, state=s), (q, k, v, state)
    )


def test_state_carried_across_chunks_matches_one_pass_with_gradients():
    q, k, v = random_qkv(2, 3, 3, 40, 40, 5)
    decay = torch.tensor([0.5, 0.93, 1.0], dtype=torch.float64)
    whole, final = lightning_attention_torch(q, k, v, decay, 8)
    first, state = lightning_attention_torch(q[:, :, :24], k[:, :, :24], v[:, :, :24], decay, 8)
    second, last = lightning_attention_torch(q[:, :, 24:], k[:, :, 24:], v[:, :, 24:], decay, 8, state=state)
    torch.testing.assert_close(torch.cat([first, second], dim=-2), whole, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(last, final, rtol=1e-12, atol=1e-13)
    cot, cot_state = torch.randn_like(whole), torch.randn_like(final)
    one = torch.autograd.grad((whole * cot).sum() + (final * cot_state).sum(), (q, k, v))
    two = torch.autograd.grad((torch.cat([first, second], -2) * cot).sum() + (last * cot_state).sum(), (q, k, v))
    for a, b in zip(one, two):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("pattern,lq,lk", [("CS", 70, 70), ("CS", 30, 50), ("NS", 45, 45), ("NC", 50, 33)])
def test_sequence_chunking_matches_reference(pattern, lq, lk):
    attn = create_attention("lightning", pattern, 4, 8, block_size=8)
    attn.seq_chunk = 16
    assert_reference_agrees(attn, lq, lk)


def test_tnl_slopes_and_decay_schedule():
    assert tnl_slopes(8) == [2.0 ** -(i + 1) for i in range(8)]
    assert tnl_slopes(4) == [2.0 ** -(2 * (i + 1)) for i in range(4)]
    six = tnl_slopes(6)
    assert six[:4] == tnl_slopes(4) and six[4:] == tnl_slopes(8)[0::2][:2]
    first = create_attention("lightning", "CS", 8, 4)
    last = create_attention("lightning", "CS", 8, 4, layer_fraction=1.0)
    torch.testing.assert_close(first.lambdas, torch.exp(-torch.tensor(tnl_slopes(8), dtype=torch.float64) * (1 + 1e-5)))
    assert bool((last.lambdas > 0.9999).all())  # the last layer barely decays
    assert bool((create_attention("lightning", "CS", 8, 4, decay="none").lambdas == 1).all())


def test_ns_decay_is_symmetric_and_cross_has_none():
    attn = create_attention("lightning", "NS", 2, 4, norm=False, activation="identity")
    q, k, v = (t.detach() for t in random_qkv(1, 2, 2, 9, 9, 4))
    lam = attn.lambdas.reshape(-1, 1, 1)
    i = torch.arange(9, dtype=torch.float64)
    weights = (q @ k.transpose(-1, -2)) * lam ** (i[:, None] - i[None, :]).abs()
    torch.testing.assert_close(attn(q, k, v), weights @ v, rtol=1e-10, atol=1e-12)
    cross = create_attention("lightning", "NC", 2, 4, norm=False, activation="identity")
    torch.testing.assert_close(cross(q, k, v), (q @ k.transpose(-1, -2)) @ v, rtol=1e-10, atol=1e-12)


def test_output_norm_is_rms_over_all_heads():
    attn = create_attention("lightning", "CS", 4, 8)
    q, k, v = (t.detach() for t in random_qkv(2, 4, 4, 20, 20, 8))
    out = attn(q, k, v)
    rms = out.pow(2).mean(dim=(1, 3)).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prefill", [0, 7])
def test_decode_matches_forward(prefill):
    attn = create_attention("lightning", "CS", 4, 8)
    q, k, v = (t.detach() for t in random_qkv(2, 4, 2, 19, 19, 8))
    pad = torch.zeros(2, 19, dtype=torch.bool)
    pad[1, :min(2, prefill)] = True  # padding only among the prefilled tokens (decode_step takes none)
    full = attn(q, k, v, pad)
    state = attn.decode_init(k[:, :, :prefill], v[:, :, :prefill], pad[:, :prefill])
    assert attn.decode_state_bytes(state) == 2 * 4 * 8 * 8 * 8  # (B, H, Dk, Dv) float64, whatever the length
    for t in range(prefill, 19):
        out, state = attn.decode_step(state, q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1])
        torch.testing.assert_close(out[:, :, 0], full[:, :, t], rtol=1e-9, atol=1e-11)


def test_rejects_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        create_attention("lightning", "CS", 2, 4, backend="cuda")
    assert create_attention("lightning", "CS", 2, 4).backend == "torch"
