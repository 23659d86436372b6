"""emma (M63): the closed-form expected monotonic alignment against Raffel et al.'s element-wise recurrence,
outputs and gradients; alignments are distributions; streaming decode equals forward; conformance; finite and
accurate at large logits (issue 16)."""

import pytest
import torch

from cab import create_attention
from tests.attn_helpers import assert_forward_matches_reference, holey_padding, random_qkv


@pytest.mark.parametrize("pattern,lq,lk", [("NC", 5, 9), ("CC", 7, 6), ("CC", 4, 11)])
def test_forward_matches_the_elementwise_recurrence_with_gradients(pattern, lq, lk):
    attn = create_attention("emma", pattern, 2, 4, energy_bias=-1.0).double()
    q, k, v = random_qkv(2, 2, 1, lq, lk, 4)
    pad = holey_padding(lk)
    pad[0, 0] = True  # a padded first key is passed over
    assert_forward_matches_reference(attn, q, k, v, pad, wrt=(q, k, v, attn.energy_bias))


def test_alignment_is_a_distribution_that_moves_monotonically():
    """With the forced stop at the last real key each step's alignment sums to 1, and a large energy bias
    (always stop) keeps every step on the first key while a very negative one sends it to the end."""
    attn = create_attention("emma", "NC", 1, 4).double()
    q, k, v = (t.detach() for t in random_qkv(1, 1, 1, 6, 8, 4, seed=2))
    real, last = attn._real_and_last(None, 1, 8, q.device)
    alignment = attn._initial(1, 1, 8, q)
    scores = attn._energies(q, k)
    for i in range(6):
        _, new = attn._step(alignment, scores[:, :, i], real, last, v)
        torch.testing.assert_close(new.sum(-1), torch.ones(1, 1, dtype=torch.float64))
        # expected position never moves left
        pos = torch.arange(8, dtype=torch.float64)
        assert float((new * pos).sum().detach()) >= float((alignment * pos).sum().detach()) - 1e-12
        alignment = new
    with torch.no_grad():
        attn.energy_bias.fill_(40.0)
    out = attn(q, k, v)
    torch.testing.assert_close(out, v[:, :, :1].expand_as(out))  # stops at key 0, attends only it
    with torch.no_grad():
        attn.energy_bias.fill_(-40.0)
    soft = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1) @ v  # stops at the end: full lookback softmax
    torch.testing.assert_close(attn(q, k, v), soft)


def test_streaming_decode_equals_forward():
    attn = create_attention("emma", "CC", 2, 4, energy_bias=-0.5)
    q, k, v = (t.detach().float() for t in random_qkv(2, 2, 2, 6, 9, 4, seed=1))
    pad = holey_padding(9)
    state, rows = attn.decode_init(k, v, pad), []
    for i in range(6):
        out, state = attn.decode_step(state, q[:, :, i:i + 1])
        rows.append(out)
    torch.testing.assert_close(torch.cat(rows, dim=2), attn(q, k, v, pad), rtol=1e-5, atol=1e-6)


def test_self_patterns_are_unsupported_with_a_reason():
    with pytest.raises(ValueError, match="separate source"):
        create_attention("emma", "CS", 2, 4)


def _large_logit_inputs(max_logit, seed=0):
    """Seeded float64 q (2, 4, 48, 32), k, v (2, 4, 32, 32), a holey key padding and a cotangent, q and k
    scaled so that the largest |q.k / sqrt(d)| over the visible (real-key) pairs is `max_logit`."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, 48, 32, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, 4, 32, 32, generator=gen, dtype=torch.float64) for _ in range(2))
    cot = torch.randn(2, 4, 48, 32, generator=gen, dtype=torch.float64)
    pad = holey_padding(32)
    pad[0, :2] = True  # padded first keys too
    scores = (q @ k.transpose(-1, -2) / 32 ** 0.5).masked_fill(pad[:, None, None, :], 0.0)
    scale = (max_logit / scores.abs().amax()) ** 0.5
    return q * scale, k * scale, v, pad, cot


def _run(attn, q, k, v, pad, cot, dtype):
    """Output and gradients (q, k, v, energy bias) of one forward and backward in `dtype`, as float64."""
    attn.zero_grad(set_to_none=True)
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out = attn(q, k, v, pad)
    out.backward(cot.to(dtype))
    return [t.detach().double() for t in (out, q.grad, k.grad, v.grad, attn.energy_bias.grad)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pattern", ["NC", "CC"])
def test_outputs_and_gradients_stay_finite_at_large_logits(pattern, dtype):
    """Issue 16: every prefix softmax of the lookback was shifted by the row's maximum, so a prefix scoring far
    below a later key underflowed its normaliser and alpha / Z overflowed (NaN outputs in float32 from
    |logit| ~ 144, NaN gradients from ~ 100)."""
    torch.manual_seed(0)
    attn = create_attention("emma", pattern, 4, 32)
    for max_logit in (144.0, 200.0, 1000.0):
        q, k, v, pad, cot = _large_logit_inputs(max_logit)
        for name, t in zip(("output", "dq", "dk", "dv", "d energy_bias"), _run(attn, q, k, v, pad, cot, dtype)):
            bad = int((~torch.isfinite(t)).sum())
            assert bad == 0, f"{dtype} |logit| {max_logit}: {bad} non-finite {name}"


@pytest.mark.parametrize("pattern", ["NC", "CC"])
def test_float32_agrees_with_float64_at_large_logits(pattern):
    """Finite is not enough: at |logit| ~ 200, float32 outputs and gradients match float64 on the same
    (float32-rounded) inputs (measured relative errors ~1e-6 for the output, ~3e-6 for the gradients)."""
    torch.manual_seed(0)
    attn = create_attention("emma", pattern, 4, 32)
    inputs = _large_logit_inputs(200.0)
    q, k, v, pad, cot = (t.float().double() if t.is_floating_point() else t for t in inputs)
    single = _run(attn.float(), q, k, v, pad, cot, torch.float32)
    double = _run(attn.double(), q, k, v, pad, cot, torch.float64)
    for name, a, b in zip(("output", "dq", "dk", "dv", "d energy_bias"), single, double):
        assert torch.isfinite(a).all(), name
        assert float((a - b).norm() / b.norm()) < 2e-5, name
    torch.testing.assert_close(single[0], double[0], rtol=1e-4, atol=1e-4)


def test_streaming_decode_equals_forward_at_large_logits():
    attn = create_attention("emma", "CC", 4, 32)
    inputs = _large_logit_inputs(1000.0, seed=1)
    q, k, v, pad, _ = (t.float() if t.is_floating_point() else t for t in inputs)
    state, rows = attn.decode_init(k, v, pad), []
    for i in range(q.shape[2]):
        out, state = attn.decode_step(state, q[:, :, i:i + 1])
        rows.append(out)
    stream = torch.cat(rows, dim=2)
    assert torch.isfinite(stream).all()
    # one query's scores are a different matmul from the whole block's: at |logit| 1000 they differ by float32
    # rounding (~1000 * 2^-24 per term), which the lookback softmax passes on (measured up to 4e-5)
    torch.testing.assert_close(stream, attn(q, k, v, pad), rtol=1e-4, atol=2e-4)
