"""sea: forward vs its explicit estimate-and-sort loop (outputs and gradients), exactness when every block is kept
(test_every_attention.py), the top block of the feature estimate by hand, the estimate approaching the exact
block mass with many features, causality, conformance."""

import pytest
import torch

from cab import create_attention
from tests.attn_helpers import SHAPES_SHORT, assert_causal_prefixes_match, assert_reference_agrees, random_qkv

SMALL = {"block_size": 4, "topk": 3, "num_features": 16}


@pytest.mark.parametrize("pattern,lq,lk", SHAPES_SHORT)
def test_forward_matches_reference_with_gradients(pattern, lq, lk):
    attn = create_attention("sea", pattern, 4, 8, block_size=3, topk=3, num_features=16)
    assert_reference_agrees(attn, lq, lk)


def test_estimate_converges_to_the_exact_block_mass():
    """The log estimated block mass approaches log sum_{j in block} exp(q.k_j / sqrt d) (up to the row
    constant) as the number of random features grows (FAVOR+ is unbiased), and then picks the true best
    block far more often than chance (1/16)."""
    q, k, _ = (t.detach() for t in random_qkv(1, 1, 1, 64, 64, 8, seed=3))
    exact = torch.log(torch.exp(q @ k.transpose(-1, -2) / 8 ** 0.5).reshape(1, 1, 64, 16, 4).sum(-1))
    errors = []
    for m in (64, 4096):
        attn = create_attention("sea", "NS", 1, 8, block_size=4, topk=1, num_features=m)
        scores, _ = attn.estimate(q, k, None)
        diff = (scores - scores.mean(-1, keepdim=True)) - (exact - exact.mean(-1, keepdim=True))
        errors.append(float(diff.abs().mean()))
    assert errors[1] < errors[0] / 2, errors
    assert (scores.argmax(-1) == exact.argmax(-1)).double().mean() > 0.5


@pytest.mark.parametrize("pattern", ["NS", "CS"])
def test_top_block_of_the_feature_estimate_by_hand(pattern):
    """Blocks of 4 over 16 keys, top 1, m = 4 features: by hand phi(x) = exp(w . x' - |x'|^2 / 2) / sqrt(m)
    with x' = x / d^(1/4) and the seeded w, A_hat[i, c] = phi(q_i) . sum_{j in c, visible} phi(k_j) (CS: keys
    <= i, blocks up to i's own), each row attends exactly to its argmax block. The crude estimate picks a
    block other than the one of largest true mass on some rows, so the estimate, not the exact mass, decides."""
    q, k, v = (t.detach() for t in random_qkv(1, 1, 1, 16, 16, 4, seed=0))
    attn = create_attention("sea", pattern, 1, 4, block_size=4, topk=1, num_features=4)
    w = attn.projection[0].double()

    def phi(x):
        x = x / 4 ** 0.25
        return torch.exp(x @ w - 0.5 * (x * x).sum(-1, keepdim=True)) / 2.0

    phi_q, phi_k = phi(q[0, 0]), phi(k[0, 0])
    expected, differs = torch.zeros(16, 4, dtype=torch.float64), False
    for i in range(16):
        visible = {c: [j for j in range(4 * c, 4 * c + 4) if pattern == "NS" or j <= i] for c in range(4)}
        visible = {c: keys for c, keys in visible.items() if keys}
        best = max(visible, key=lambda c: float(phi_q[i] @ phi_k[visible[c]].sum(0)))
        true_best = max(visible, key=lambda c: float(torch.exp(k[0, 0, visible[c]] @ q[0, 0, i] / 2.0).sum()))
        differs |= best != true_best
        keys = visible[best]
        expected[i] = torch.softmax(k[0, 0, keys] @ q[0, 0, i] / 2.0, dim=0) @ v[0, 0, keys]
    assert differs
    torch.testing.assert_close(attn(q, k, v)[0, 0], expected)


def test_causal_rows_ignore_the_future():
    attn = create_attention("sea", "CS", 2, 8, **SMALL)
    assert_causal_prefixes_match(attn)
