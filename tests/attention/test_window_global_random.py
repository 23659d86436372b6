"""window_global_random (block-sparse band + global + random, M36): forward vs the row-by-row reference, the
visible blocks enumerated by hand, the block structure (band and global blocks always there, at most
`random_blocks` more per head and query block, past-only in CS, seeded, per head, independent of the length),
the FlexAttention backend, conformance."""

import pytest
import torch

from cab import create_attention
from cab.attention.window_global_random import _hash_uniform_index
from tests.attn_helpers import assert_block_layout_matches_reference, holey_padding, random_qkv

SMALL = {"block": 4, "window": 3, "global_blocks": 1, "random_blocks": 2}


@pytest.mark.parametrize("pattern,hparams,lq,lk", [
    ("NS", SMALL, 45, 45), ("CS", SMALL, 50, 50), ("CS", {"block": 3}, 20, 33),
    ("NS", {"block": 5, "window": 1}, 37, 37),
])
def test_forward_matches_reference(pattern, hparams, lq, lk):
    attn = create_attention("window_global_random", pattern, 4, 8, **hparams)
    assert_block_layout_matches_reference(attn, lq, lk, heads=4, batch=2)


def _block_mask(attn, length):
    """(H, blocks, blocks) bool at the pattern's block size, read off the element mask."""
    b = attn.block
    mask = attn.visible_mask(length, length)[0]
    n = length // b
    return mask[:, :n * b, :n * b].reshape(mask.shape[0], n, b, n, b).any(-1).any(2)


@pytest.mark.parametrize("pattern", ["NS", "CS"])
def test_block_structure(pattern):
    attn = create_attention("window_global_random", pattern, 4, 4, **SMALL)
    blocks = _block_mask(attn, 160)  # 40 blocks
    m = torch.arange(40)[:, None]
    n = torch.arange(40)[None, :]
    band = (m - n).abs() <= 1
    glob = (n < 1) | (m < 1)
    allowed = band | glob
    if pattern == "CS":
        allowed = allowed & (n <= m)
    assert bool((blocks | ~allowed).all())  # band and global blocks always present
    extra = blocks & ~allowed
    assert int(extra.sum(-1).max()) <= 2 and int(extra.sum()) > 0
    if pattern == "CS":
        assert not bool((blocks & (n > m)).any())
    assert not torch.equal(extra[0], extra[1])  # drawn per head
    other = create_attention("window_global_random", pattern, 4, 4, seed=1, **SMALL)
    assert not torch.equal(_block_mask(other, 160), blocks)  # seeded


@pytest.mark.parametrize("pattern", ["NS", "CS"])
def test_blocks_enumerated_by_hand(pattern):
    """Blocks of 2 over 16 keys (8 blocks), band of 3, block 0 global, one random block: by hand, query block
    m sees blocks m - 1, m, m + 1, block 0, every block when m = 0, and the draw hash(seed, head, m, 0) mod N
    over N = the blocks up to the last real key (NS, keys 11.. padded: 6 blocks, not 8) or N = m (CS: the
    blocks before m, none for m = 0); CS keeps key <= query. Forward = a softmax over exactly those real keys."""
    attn = create_attention("window_global_random", pattern, 2, 4, block=2, window=3, global_blocks=1,
                            random_blocks=1)
    q, k, v = (t.detach() for t in random_qkv(1, 2, 2, 16, 16, 4, seed=2))
    pad = torch.zeros(1, 16, dtype=torch.bool)
    pad[0, 5] = True
    if pattern == "NS":
        pad[0, 11:] = True  # trailing padding: the extent, and so the random draws' range, ends at key 10
    expected, random_seen = torch.zeros(2, 16, 4, dtype=torch.float64), 0
    for h in range(2):
        for i in range(16):
            m = i // 2
            blocks = {n for n in (m - 1, m, m + 1) if 0 <= n < 8} | {0} | (set(range(8)) if m == 0 else set())
            choices = m if pattern == "CS" else 6
            if choices:
                draw = int(_hash_uniform_index(0, torch.tensor(h), torch.tensor(m), 0, torch.tensor(choices)))
                random_seen += draw not in blocks
                blocks.add(draw)
            keys = [j for j in range(16) if not pad[0, j] and j // 2 in blocks and (pattern == "NS" or j <= i)]
            expected[h, i] = torch.softmax(k[0, h, keys] @ q[0, h, i] / 2.0, dim=0) @ v[0, h, keys]
    assert random_seen
    torch.testing.assert_close(attn(q, k, v, pad)[0], expected)


def test_causal_pattern_does_not_depend_on_the_length():
    attn = create_attention("window_global_random", "CS", 2, 4, **SMALL)
    assert torch.equal(attn.visible_mask(100, 100)[..., :60, :60], attn.visible_mask(60, 60))


def test_flex_backend_matches_torch():
    """float64: FlexAttention's unfused path evaluates the per-head mask_mod (int32 indices) and BlockMask."""
    flex = create_attention("window_global_random", "NS", 4, 8, backend="flex", **SMALL)
    eager = create_attention("window_global_random", "NS", 4, 8, **SMALL)
    q, k, v = (t.detach() for t in random_qkv(2, 4, 2, 150, 150, 8))
    pad = holey_padding(150)
    torch.testing.assert_close(flex(q, k, v, pad), eager(q, k, v, pad), rtol=1e-10, atol=1e-12)
