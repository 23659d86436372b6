"""pooled_latent (M65.perceiver): forward vs the latent-by-latent reference (outputs and gradients), the
exact limit with one key per latent, the key-to-latent grouping by hand, no leak through the latents under
CC, conformance."""

import pytest
import torch

from cab import create_attention
from tests.attn_helpers import assert_forward_matches_reference, holey_padding, random_qkv


@pytest.mark.parametrize("pattern,lq,lk", [("NS", 23, 23), ("NC", 11, 29), ("CC", 29, 11)])
@pytest.mark.parametrize("latents", [1, 4, 40])
def test_forward_matches_reference_with_gradients(pattern, lq, lk, latents):
    attn = create_attention("pooled_latent", pattern, 4, 8, num_latents=latents)
    q, k, v = random_qkv(2, 4, 2, lq, lk, 8)
    pad = holey_padding(lk)
    pad[1, :3] = True  # a whole first segment of padding when latents are many
    assert_forward_matches_reference(attn, q, k, v, pad)


def test_one_key_per_latent_is_a_two_hop_softmax():
    """With r = Lk each latent query is one key: latent m's value is softmax(k_m K^T) V and the read-out
    is softmax(q K^T) over those values."""
    q, k, v = (t.detach() for t in random_qkv(1, 2, 2, 5, 7, 4))
    out = create_attention("pooled_latent", "NC", 2, 4, num_latents=7)(q, k, v)
    kk = torch.softmax(k @ k.transpose(-1, -2) / 2.0, dim=-1) @ v
    expected = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1) @ kk
    torch.testing.assert_close(out, expected)


def test_keys_pool_into_latents_by_rank_among_the_real_keys():
    """Grouping by hand: element 0 has 9 keys with 0 and 4 padded, so its N = 7 real keys of ranks 0..6 fall
    into floor(rank * 3 / 7) = 0, 0, 0, 1, 1, 2, 2: groups {1, 2, 3}, {5, 6}, {7, 8} (by position they would be
    {1, 2}, {3, 5}, {6, 7, 8}); element 1 has no padding: {0, 1, 2}, {3, 4, 5}, {6, 7, 8}. Each latent is its
    group's key mean, attends every real key, and each query reads the three latents."""
    q, k, v = (t.detach() for t in random_qkv(2, 2, 2, 4, 9, 4, seed=5))
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[0, [0, 4]] = True
    groups = [[[1, 2, 3], [5, 6], [7, 8]], [[0, 1, 2], [3, 4, 5], [6, 7, 8]]]
    out = create_attention("pooled_latent", "NC", 2, 4, num_latents=3)(q, k, v, pad)
    for b in range(2):
        real = (~pad[b]).nonzero().flatten()
        z = torch.stack([k[b, :, g].mean(dim=1) for g in groups[b]], dim=1)  # (H, 3, D)
        latent_values = torch.softmax(z @ k[b, :, real].transpose(-1, -2) / 2.0, dim=-1) @ v[b, :, real]
        expected = torch.softmax(q[b] @ z.transpose(-1, -2) / 2.0, dim=-1) @ latent_values
        torch.testing.assert_close(out[b], expected)


def test_all_padding_outputs_zero_and_causal_self_is_unsupported():
    q, k, v = (t.detach() for t in random_qkv(2, 2, 2, 5, 6, 4))
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[0] = True
    out = create_attention("pooled_latent", "NC", 2, 4, num_latents=3)(q, k, v, pad)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and out[1].abs().sum() > 0
    with pytest.raises(ValueError, match="abc's prefix control"):
        create_attention("pooled_latent", "CS", 2, 4)
