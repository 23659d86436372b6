"""triple_wise_attention (M59): blocked forward (factored value sum) vs the per-row reference over every key
pair (outputs and gradients, every pattern, odd and unequal lengths, holey padding, GQA); a tiny example
computed by hand with `math`; the declared memory bound; conformance (slow: the pair scores are cubic)."""

import itertools
import math

import pytest
import torch

from cab import create_attention
from tests.attn_helpers import assert_reference_agrees, random_qkv

NAME = "triple_wise_attention"
SHAPES = [("NS", 11, 11), ("CS", 11, 11), ("CS", 5, 9), ("CS", 9, 5), ("NC", 5, 9), ("CC", 9, 5)]


@pytest.mark.parametrize("pattern,lq,lk", SHAPES)
def test_forward_matches_reference(pattern, lq, lk):
    attn = create_attention(NAME, pattern, 4, 8, chunk_size=4)
    assert_reference_agrees(attn, lq, lk)


def test_by_hand():
    """d = 2, three keys: A_(j1,j2) = exp(<q, k_j1 * k_j2> / sqrt 2) over the 9 pairs, values v_j1 * v_j2."""
    qs = [0.5, -1.0]
    ks = [[1.0, 0.5], [-0.5, 2.0], [1.5, -1.0]]
    vs = [[1.0, 2.0], [3.0, -1.0], [-2.0, 0.5]]
    pairs = list(itertools.product(range(3), repeat=2))
    scores = [sum(qs[c] * ks[a][c] * ks[b][c] for c in range(2)) / math.sqrt(2) for a, b in pairs]
    weights = [math.exp(s) / sum(math.exp(x) for x in scores) for s in scores]
    expected = [sum(w * vs[a][c] * vs[b][c] for w, (a, b) in zip(weights, pairs)) for c in range(2)]
    t = lambda rows: torch.tensor(rows, dtype=torch.float64)[None, None]  # noqa: E731
    out = create_attention(NAME, "NS", 1, 2)(t([qs]), t(ks), t(vs))[0, 0, 0]
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64))


def test_first_causal_row_is_the_square_of_its_value():
    q, k, v = (t.detach() for t in random_qkv(1, 2, 2, 6, 6, 8))
    out = create_attention(NAME, "CS", 2, 8)(q, k, v)
    torch.testing.assert_close(out[..., 0, :], v[..., 0, :] ** 2)


def test_memory_bound_is_declared_and_quadratic_in_the_keys():
    attn = create_attention(NAME, "NS", 8, 64)
    small, large = (attn.peak_memory_estimate(1, 1024, lk, 8, "fwd", torch.float32) for lk in (1024, 2048))
    pair_scores = 8 * 16 * 1024 * 1024 * 4  # one block's float32 pair scores
    assert pair_scores < small < 2**32  # B=1, H=8, C=16, Lk=1024: above one score tensor, a few GiB at most
    assert 3.5 < large / small < 4.5
    assert attn.algorithmic_flops(1, 1024, 1024, 8) == 4 * 8 * 1024**3 * 64
