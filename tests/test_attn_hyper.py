"""hyper: forward vs its row-by-row reference (outputs and gradients, all patterns, through the causal
recursion), exactness when the heavy block covers every key, the sampled estimate converging with more
samples, the Gray ranking, causality, conformance."""

import pytest
import torch

from attn_helpers import assert_causal_prefixes_match, assert_forward_matches_reference, holey_padding, random_qkv
from cab import create_attention
from cab.attention.hyper import _gray_rank
from cab.check import run_conformance
from cab.patterns import attention_mask
from cab.status import Status

SMALL = {"block_size": 4, "sample_size": 5, "min_seq_len": 4, "lsh_num_projs": 3}
CHECK = {"block_size": 8, "sample_size": 6, "min_seq_len": 8, "lsh_num_projs": 3}  # approximate at L = 48


def _exact(q, k, v, pattern, pad):
    mask = attention_mask(pattern, q.shape[-2], k.shape[-2], pad)
    w = torch.softmax((q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).masked_fill(~mask, float("-inf")), -1)
    return torch.nan_to_num(w) @ v


@pytest.mark.parametrize("pattern,lq,lk", [
    ("NS", 23, 23), ("CS", 23, 23), ("CS", 19, 27), ("CS", 27, 19), ("NC", 27, 19), ("CC", 19, 27),
])
def test_forward_matches_reference_with_gradients(pattern, lq, lk):
    attn = create_attention("hyper", pattern, 4, 8, **SMALL)
    q, k, v = random_qkv(2, 4, 2, lq, lk, 8)
    assert_forward_matches_reference(attn, q, k, v, holey_padding(lk))


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


def test_gray_rank_orders_neighbouring_codes_one_bit_apart():
    bits = torch.tensor([[int(c) for c in f"{n:04b}"] for n in range(16)])
    ranks = _gray_rank(bits)
    assert sorted(ranks.tolist()) == list(range(16))
    by_rank = bits[torch.argsort(ranks)]
    assert ((by_rank[1:] != by_rank[:-1]).sum(-1) == 1).all()


def test_causal_rows_ignore_the_future():
    attn = create_attention("hyper", "CS", 2, 8, **SMALL)
    assert_causal_prefixes_match(attn)


@pytest.mark.parametrize("pattern", ["NS", "CS", "NC", "CC"])
def test_conformance(pattern):
    report = run_conformance("hyper", pattern, hparams=CHECK)
    assert report.status is Status.OK, report.message
