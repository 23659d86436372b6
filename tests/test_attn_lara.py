"""lara: forward vs its explicit-density reference, segment boundaries vs an independent rule, sampling
seeds, exact cases, padding, the refused causal self pattern, and conformance."""

import pytest
import torch

from cab import UnsupportedPattern, create_attention
from cab.attention.lara import segment_ids, segment_means
from cab.check import run_conformance
from cab.status import Status
from attn_helpers import assert_forward_matches_reference, holey_padding, random_qkv


_inputs = random_qkv


@pytest.mark.parametrize("pattern,lq,lk,landmarks,seed", [
    ("NS", 37, 37, 6, None), ("NS", 20, 20, 4, 3), ("NS", 5, 5, 8, None), ("NC", 23, 41, 5, None),
    ("NC", 30, 9, 4, 1), ("CC", 41, 23, 6, 2),
])
def test_forward_matches_reference_with_gradients(pattern, lq, lk, landmarks, seed):
    attn = create_attention("lara", pattern, 4, 8, num_landmarks=landmarks, seed=seed)
    q, k, v = _inputs(2, 4, 2, lq, lk, 8)
    assert_forward_matches_reference(attn, q, k, v, holey_padding(lk))


def test_segments_follow_the_real_positions():
    """Segment c holds the real positions of rank r with ceil(c n / C) <= r < ceil((c + 1) n / C), whatever
    the padding around them; means and counts agree with a per-segment loop."""
    real = torch.tensor([[True] * 10 + [False] * 3, [False, True, True, False] + [True] * 9])
    segments = 4
    ids = segment_ids(real, segments)
    x = torch.randn(2, 1, 13, 3, dtype=torch.float64)
    means, counts = segment_means(x, real, segments)
    for b in range(2):
        positions = torch.nonzero(real[b]).flatten()
        n = len(positions)
        for c in range(segments):
            lo, hi = -(-c * n // segments), -(-(c + 1) * n // segments)
            members = positions[lo:hi]
            assert (ids[b, members] == c).all() and int(counts[b, c]) == len(members)
            torch.testing.assert_close(means[b, 0, c], x[b, 0, members].mean(0))
        assert (ids[b, ~real[b]] == -1).all()


def test_more_landmarks_than_positions_drops_the_empty_proposals():
    q, k, v = (t.detach() for t in _inputs(1, 2, 2, 3, 3, 4))
    few = create_attention("lara", "NS", 2, 4, num_landmarks=3)
    many = create_attention("lara", "NS", 2, 4, num_landmarks=7)  # 4 of the 7 segments are empty
    torch.testing.assert_close(many(q, k, v), few(q, k, v))


def test_estimates_are_exact_where_softmax_attention_is_trivial():
    """One key: every f(w) is that value. Equal values: every f(w) is that value."""
    q, k, v = (t.detach() for t in _inputs(2, 2, 2, 9, 1, 4))
    attn = create_attention("lara", "NC", 2, 4, seed=0)
    torch.testing.assert_close(attn(q, k, v), v.expand(2, 2, 9, 4))
    q, k, v = (t.detach() for t in _inputs(2, 2, 2, 9, 9, 4))
    same = torch.ones_like(v) * torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=v.dtype)
    torch.testing.assert_close(create_attention("lara", "NS", 2, 4)(q, k, same), same)


def test_seed_fixes_the_samples():
    q, k, v = (t.detach() for t in _inputs(1, 2, 2, 20, 20, 4))
    mean_only = create_attention("lara", "NS", 2, 4)
    assert torch.equal(mean_only.noise, torch.zeros_like(mean_only.noise))
    sampled = create_attention("lara", "NS", 2, 4, seed=7)
    torch.testing.assert_close(sampled(q, k, v), create_attention("lara", "NS", 2, 4, seed=7)(q, k, v), rtol=0, atol=0)
    assert not torch.allclose(sampled(q, k, v), mean_only(q, k, v))
    assert not torch.allclose(sampled(q, k, v), create_attention("lara", "NS", 2, 4, seed=8)(q, k, v))


def test_causal_self_is_refused_with_a_reason():
    with pytest.raises(UnsupportedPattern, match="proposals"):
        create_attention("lara", "CS", 2, 8)


@pytest.mark.parametrize("pattern", ["NS", "CS", "NC", "CC"])
def test_conformance(pattern):
    report = run_conformance("lara", pattern)
    expected = Status.UNSUPPORTED if pattern == "CS" else Status.OK
    assert report.status is expected, report.message
