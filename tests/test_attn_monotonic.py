"""emma (M63): the closed-form expected monotonic alignment against Raffel et al.'s element-wise recurrence,
outputs and gradients; alignments are distributions; streaming decode equals forward; conformance."""

import pytest
import torch

from cab import create_attention
from cab.check import run_conformance
from cab.status import Status
from attn_helpers import assert_forward_matches_reference, holey_padding, random_qkv


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


@pytest.mark.parametrize("pattern", ["NC", "CC"])
def test_conformance(pattern):
    report = run_conformance("emma", pattern)
    assert report.status is Status.OK, report.message
