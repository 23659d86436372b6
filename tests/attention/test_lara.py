"""lara: forward vs its explicit-density reference, segment boundaries vs an independent rule, the estimate
from segment-mean proposals by hand, sampling seeds, exact cases, padding, the refused causal self pattern,
and conformance."""

import pytest
import torch

from cab import create_attention
from cab.attention.lara import segment_ids, segment_means
from tests.attn_helpers import assert_forward_matches_reference, holey_padding, random_qkv

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


@pytest.mark.parametrize("pattern,lq,query_groups", [
    ("NS", 8, [[0, 3], [4, 5], [6, 7]]), ("NC", 5, [[0, 1], [2, 3], [4]]), ("CC", 5, None),
])
def test_estimate_from_segment_mean_proposals_by_hand(pattern, lq, query_groups):
    """Keys 1 and 2 padded: the 6 real keys 0, 3, 4, 5, 6, 7 form the segments {0, 3}, {4, 5}, {6, 7} (by
    position they would be {0}, {3, 4, 5}, {6, 7}); NS queries share them, NC's 5 queries form {0, 1},
    {2, 3}, {4}, CC uses the keys' means alone. With those mu_c and w_c = mu_c + noise_c, the docstring's
    LARA(q) = sum_c r_c f(w_c) / sum_c r_c, r_c = exp(q.mu_c) xi(q, w_c) sum_m xi(k_m, w_c) / xi(mu_c, w_c),
    written out densely."""
    q, k, v = (t.detach() for t in _inputs(1, 2, 2, lq, 8, 4, seed=4))
    pad = torch.zeros(1, 8, dtype=torch.bool)
    pad[0, [1, 2]] = True
    attn = create_attention("lara", pattern, 2, 4, num_landmarks=3, seed=3)
    qs, ks, vs = q[0] * 4 ** -0.25, k[0] * 4 ** -0.25, v[0]  # (H, L, D)
    real = [0, 3, 4, 5, 6, 7]
    mu = torch.stack([ks[:, g].mean(1) for g in [[0, 3], [4, 5], [6, 7]]], dim=1)  # (H, C, D)
    if query_groups:
        mu = mu + torch.stack([qs[:, g].mean(1) for g in query_groups], dim=1)
    w = mu + attn.noise

    def xi(x, w):  # (H, n, C)
        return torch.exp(x @ w.transpose(-1, -2) - 0.5 * (x * x).sum(-1, keepdim=True))

    xi_k = xi(ks[:, real], w)  # (H, M, C)
    f = (xi_k.transpose(-1, -2) @ vs[:, real]) / xi_k.sum(1)[..., None]  # (H, C, Dv)
    xi_mu = torch.exp((w * mu).sum(-1) - 0.5 * (mu * mu).sum(-1))  # (H, C)
    r = torch.exp(qs @ mu.transpose(-1, -2)) * xi(qs, w) * (xi_k.sum(1) / xi_mu)[:, None, :]  # (H, Lq, C)
    torch.testing.assert_close(attn(q, k, v, pad)[0], (r @ f) / r.sum(-1, keepdim=True))


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
