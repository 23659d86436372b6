"""moh (M6): forward vs reference (outputs, gradients of q, k, v and the router weights), gate semantics
(shared + top-k heads active, the rest exactly 0, gates from the paper's two-level softmax), the router reads
only the token's own queries, computed pairs, conformance on every pattern."""

import pytest
import torch

from cab import create_attention
from tests.attn_helpers import assert_forward_matches_reference, holey_padding, random_qkv


@pytest.mark.parametrize("pattern,lq,lk,hkv", [("NS", 37, 37, 2), ("CS", 23, 37, 4), ("CS", 37, 23, 2),
                                               ("NC", 20, 31, 2), ("CC", 31, 20, 1)])
def test_forward_matches_reference_with_gradients(pattern, lq, lk, hkv):
    attn = create_attention("moh", pattern, 4, 8).double()
    q, k, v = random_qkv(2, 4, hkv, lq, lk, 8)
    wrt = (q, k, v, attn.w_shared, attn.w_routed, attn.w_mix)
    assert_forward_matches_reference(attn, q, k, v, holey_padding(lk), wrt=wrt)


def test_gates_follow_the_paper_two_level_softmax():
    attn = create_attention("moh", "NS", 6, 4, shared_heads=2, top_k=2).double()
    q, _, _ = random_qkv(1, 6, 6, 5, 5, 4)
    g = attn.gates(q)[0].detach()  # (H, L)
    x = q[0].detach().transpose(0, 1).reshape(5, 24)
    a = torch.softmax(x @ attn.w_mix.double().T, -1)
    shared = a[:, :1] * torch.softmax(x @ attn.w_shared.double().T, -1)
    logits = x @ attn.w_routed.double().T
    routed = a[:, 1:] * torch.softmax(logits, -1)
    keep = logits >= logits.topk(2, -1).values[:, -1:]
    torch.testing.assert_close(g.T, torch.cat([shared, routed * keep], -1))
    active = attn.active(q)[0]
    assert torch.equal(active.sum(0), torch.full((5,), 4)) and bool(active[:2].all())
    assert torch.equal(active, g > 0)


def test_unselected_heads_output_zero_and_active_heads_are_gated_exact_attention():
    attn = create_attention("moh", "CS", 4, 8, shared_heads=1, top_k=1).double()
    q, k, v = random_qkv(2, 4, 4, 9, 9, 8)
    out = attn(q, k, v).detach()
    exact = create_attention("vanilla", "CS", 4, 8)(q, k, v).detach()
    g = attn.gates(q).detach()
    active = attn.active(q)
    assert bool((out[~active] == 0).all())
    torch.testing.assert_close(out, exact * g[..., None])
    assert int(active.sum()) == 2 * 9 * 2
    # CS: a (batch, head) scores its active rows against the keys up to its last active row
    last = [int(active[b, h].nonzero().max()) + 1 for b in range(2) for h in range(4)]
    assert attn.computed_pairs(q, k, v) == sum(n * int(a.sum()) for n, a in zip(last, active.reshape(8, 9)))


def test_router_reads_only_the_token_itself():
    """Changing token j's queries changes no other token's gates (in any pattern)."""
    attn = create_attention("moh", "NC", 4, 8).double()
    q, _, _ = random_qkv(1, 4, 4, 7, 7, 8)
    q2 = q.detach().clone()
    q2[:, :, 3] += 5.0
    g1, g2 = attn.gates(q).detach(), attn.gates(q2).detach()
    others = [i for i in range(7) if i != 3]
    torch.testing.assert_close(g1[..., others], g2[..., others])
    assert not torch.allclose(g1[..., 3], g2[..., 3])


def test_hyper_parameters_validated():
    with pytest.raises(ValueError):
        create_attention("moh", "NS", 4, 8, shared_heads=2, top_k=3)
    with pytest.raises(ValueError):
        create_attention("moh", "NS", 4, 8, shared_heads=0, top_k=0)
