"""hyper: forward vs its row-by-row reference (outputs and gradients, all patterns, through the causal
recursion), the LSH ranks, heavy blocks and samples by hand, exactness when the heavy block covers every
key, the sampled estimate converging with more samples, the Gray ranking, causality, conformance."""

import math

import pytest
import torch

from cab import create_attention
from cab.attention.engine.routing import sample_ranks
from cab.attention.hyper import _gray_rank
from cab.patterns import attention_mask
from tests.attn_helpers import (
    SHAPES_SHORT,
    assert_causal_prefixes_match,
    assert_reference_agrees,
    holey_padding,
    random_qkv,
)

SMALL = {"block_size": 4, "sample_size": 5, "min_seq_len": 4, "lsh_num_projs": 3}
CHECK = {"block_size": 8, "sample_size": 6, "min_seq_len": 8, "lsh_num_projs": 3}  # approximate at L = 48


def _exact(q, k, v, pattern, pad):
    mask = attention_mask(pattern, q.shape[-2], k.shape[-2], pad)
    w = torch.softmax((q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).masked_fill(~mask, float("-inf")), -1)
    return torch.nan_to_num(w) @ v


@pytest.mark.parametrize("pattern,lq,lk", SHAPES_SHORT)
def test_forward_matches_reference_with_gradients(pattern, lq, lk):
    attn = create_attention("hyper", pattern, 4, 8, **SMALL)
    assert_reference_agrees(attn, lq, lk)


@pytest.mark.parametrize("pattern,lq,lk", [("NS", 40, 40), ("CS", 40, 40), ("CS", 27, 19), ("CC", 30, 23)])
def test_heavy_block_covering_every_key_is_exact(pattern, lq, lk):
    """b >= n: every block is exact, so the causal recursion's log-sum-exp merge must give exact attention."""
    q, k, v = (t.detach() for t in random_qkv(2, 2, 2, lq, lk, 8))
    pad = holey_padding(lk)
    attn = create_attention("hyper", pattern, 2, 8, block_size=64, sample_size=4, min_seq_len=4)
    torch.testing.assert_close(attn(q, k, v, pad), _exact(q, k, v, pattern, pad))


def test_sampling_estimate_converges():
    q, k, v = (t.detach() for t in random_qkv(1, 2, 2, 64, 64, 8, seed=2))
    exact = _exact(q, k, v, "NS", None)
    err = [float((create_attention("hyper", "NS", 2, 8, block_size=8, sample_size=m, lsh_num_projs=3)(q, k, v)
                  - exact).norm()) for m in (4, 4096)]
    assert err[1] < err[0] / 3, err


def test_selection_by_hand():
    """Planes e0 and e1 (r = 2): a vector's code is the signs of its first two coordinates, ranked in Gray
    order 00, 01, 11, 10. Key 5 is padded, so n = 9 real keys, sorted by (rank, position); block 3: each query's
    heavy keys are the 3 sorted keys from #(keys ranked below it) - 1, clamped to [0, 6]; its other terms are the
    4 sampled real keys (ranks among the real keys in position order, from `sample_ranks`) outside its heavy
    keys, each with logit + log(9 / 4). The LSH, the heavy blocks and the samples all change the output."""
    q, k, v = (t.detach() for t in random_qkv(1, 1, 1, 6, 10, 4, seed=4))
    pad = torch.zeros(1, 10, dtype=torch.bool)
    pad[0, 5] = True
    attn = create_attention("hyper", "NC", 1, 4, lsh_num_projs=2, block_size=3, sample_size=4)
    attn.planes.copy_(torch.eye(4)[:, :2])
    gray = {(False, False): 0, (False, True): 1, (True, True): 2, (True, False): 3}

    def rank(x):
        return gray[(bool(x[0] > 0), bool(x[1] > 0))]

    real = [0, 1, 2, 3, 4, 6, 7, 8, 9]
    by_rank = sorted(real, key=lambda j: (rank(k[0, 0, j]), j))
    sampled = [real[r] for r in sample_ranks(0, torch.tensor([0]), 4, torch.tensor([[9]]))[0, 0].tolist()]
    expected, heavy_sets, light_count = torch.zeros(6, 4, dtype=torch.float64), set(), 0
    for i in range(6):
        below = sum(rank(k[0, 0, j]) < rank(q[0, 0, i]) for j in real)
        start = min(max(below - 1, 0), 6)
        heavy = by_rank[start:start + 3]
        light = [j for j in sampled if j not in heavy]
        heavy_sets.add(tuple(heavy))
        light_count += len(light)
        logits = torch.cat([k[0, 0, heavy] @ q[0, 0, i] / 2, k[0, 0, light] @ q[0, 0, i] / 2 + math.log(9 / 4)])
        expected[i] = torch.softmax(logits, dim=0) @ v[0, 0, heavy + light]
    assert len(heavy_sets) > 1 and light_count > 0
    assert not torch.allclose(expected, _exact(q, k, v, "NC", pad)[0, 0])
    torch.testing.assert_close(attn(q, k, v, pad)[0, 0], expected)


def test_gray_rank_orders_neighbouring_codes_one_bit_apart():
    bits = torch.tensor([[int(c) for c in f"{n:04b}"] for n in range(16)])
    ranks = _gray_rank(bits)
    assert sorted(ranks.tolist()) == list(range(16))
    by_rank = bits[torch.argsort(ranks)]
    assert ((by_rank[1:] != by_rank[:-1]).sum(-1) == 1).all()


def test_causal_rows_ignore_the_future():
    attn = create_attention("hyper", "CS", 2, 8, **SMALL)
    assert_causal_prefixes_match(attn)
