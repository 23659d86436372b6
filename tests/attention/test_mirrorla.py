"""mirrorla: forward vs its reference (explicit rotation matrix, dense kernel; outputs and gradients), the
reflections are orthogonal and mix heads, decoding, conformance."""

import pytest
import torch

from cab import create_attention
from tests.attn_helpers import assert_reference_agrees


@pytest.mark.parametrize("pattern,lq,lk,block", [
    ("NS", 37, 37, 3), ("CS", 70, 70, 4), ("CS", 5, 12, 8), ("CS", 12, 5, 3), ("NC", 23, 41, 5), ("CC", 41, 23, 16),
])
def test_forward_matches_reference_with_gradients(pattern, lq, lk, block):
    attn = create_attention("mirrorla", pattern, 4, 8, block_size=block, seed=1)
    assert_reference_agrees(attn, lq, lk)


def test_reflections_are_orthogonal_and_mix_heads():
    attn = create_attention("mirrorla", "NS", 3, 8, block_size=3).double()
    rotation = attn.rotation().detach()
    torch.testing.assert_close(rotation @ rotation.T, torch.eye(24, dtype=torch.float64))
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    torch.testing.assert_close(torch.linalg.vector_norm(attn.reflect(x), dim=(1, 3)),
                               torch.linalg.vector_norm(x, dim=(1, 3)))  # an isometry of each token
    assert rotation[:8, 8:].abs().amax() > 1e-3  # head 0's features depend on head 1's
    # against plain ReLU linear attention: reflecting keeps information that ReLU truncates
    assert (attn.features(x) > 0).any(dim=-1).all()
