"""cab.models: slots pick the right attention per pattern, backbones respect their patterns' causality and
padding, multi-head attention matches torch's, and parameter counts follow CAB's 10% rule."""

import math

import pytest
import torch
from torch import nn

from cab import UnsupportedPattern
from cab.models import (
    AttentionSlots,
    Decoder,
    Encoder,
    EncoderDecoder,
    MultiHeadAttention,
    count_parameters,
    sinusoidal_positions,
)

D, HEADS = 16, 2


def attentions_of(model):
    return [(type(m).name, m.pattern.value, m.cab_tested) for m in model.modules() if hasattr(m, "cab_tested")]


def test_sinusoidal_positions_follow_the_formula():
    table = sinusoidal_positions(7, 6)
    for pos in range(7):
        for i in range(3):
            angle = pos / 10000 ** (2 * i / 6)
            assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)
    assert sinusoidal_positions(5, 7).shape == (5, 7)


def test_slots_put_the_tested_attention_in_its_pattern_only():
    slots = AttentionSlots("performer", "CC", {"num_features": 8})
    model = EncoderDecoder(D, 1, 2, HEADS, slots, autoregressive=True)
    assert attentions_of(model) == [
        ("sdpa", "NS", False), ("sdpa", "CS", False), ("performer", "CC", True),
        ("sdpa", "CS", False), ("performer", "CC", True),
    ]
    assert all(m.num_features == 8 for m in model.modules() if getattr(m, "cab_tested", False))
    nc = EncoderDecoder(D, 1, 1, HEADS, AttentionSlots("vanilla", "NC"), autoregressive=False)
    assert attentions_of(nc) == [("sdpa", "NS", False), ("sdpa", "NS", False), ("vanilla", "NC", True)]
    assert [p.value for p in nc.patterns] == ["NS", "NC"]


def test_slots_refuse_an_undeclared_pattern():
    with pytest.raises(UnsupportedPattern):
        Decoder(D, 1, HEADS, AttentionSlots("nystromformer", "CS"))


def test_multi_head_attention_matches_torch():
    torch.manual_seed(0)
    ours = MultiHeadAttention(D, HEADS, "NS", AttentionSlots("vanilla", "NS"))
    theirs = nn.MultiheadAttention(D, HEADS, batch_first=True)
    with torch.no_grad():
        theirs.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight]))
        theirs.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias]))
        theirs.out_proj.weight.copy_(ours.out_proj.weight)
        theirs.out_proj.bias.copy_(ours.out_proj.bias)
    x, memory = torch.randn(2, 5, D), torch.randn(2, 9, D)
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[1, 6:] = True
    torch.testing.assert_close(ours(x), theirs(x, x, x, need_weights=False)[0])
    torch.testing.assert_close(ours(x, memory, key_padding_mask=padding),
                               theirs(x, memory, memory, key_padding_mask=padding, need_weights=False)[0])


@pytest.mark.parametrize("attention", ["vanilla", "performer", "s4d"])
def test_decoder_is_causal(attention):
    torch.manual_seed(0)
    model = Decoder(D, 2, HEADS, AttentionSlots(attention, "CS")).eval()
    x = torch.randn(2, 12, D)
    changed = x.clone()
    changed[:, 7:] = torch.randn(2, 5, D)
    with torch.no_grad():
        out, out_changed = model(x), model(changed)
    torch.testing.assert_close(out[:, :7], out_changed[:, :7])
    assert not torch.allclose(out[:, 7:], out_changed[:, 7:])


def test_encoder_is_bidirectional_and_ignores_padding():
    torch.manual_seed(0)
    model = Encoder(D, 2, HEADS, AttentionSlots("vanilla", "NS")).eval()
    x = torch.randn(1, 10, D)
    changed = x.clone()
    changed[:, 9] = torch.randn(D)
    with torch.no_grad():
        assert not torch.allclose(model(x)[:, 0], model(changed)[:, 0])
        padded = torch.cat([x, torch.randn(1, 4, D)], dim=1)
        mask = torch.zeros(1, 14, dtype=torch.bool)
        mask[:, 10:] = True
        torch.testing.assert_close(model(padded, mask)[:, :10], model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", ["vanilla", "abc", "probsparse"])
def test_autoregressive_encoder_decoder_decodes_one_step_at_a_time(attention):
    torch.manual_seed(0)
    model = EncoderDecoder(D, 1, 2, HEADS, AttentionSlots(attention, "CC"), autoregressive=True).eval()
    source, target = torch.randn(2, 11, D), torch.randn(2, 6, D)
    changed_target, changed_source = target.clone(), source.clone()
    changed_target[:, 3:] = torch.randn(2, 3, D)
    changed_source[:, 10] = torch.randn(D)
    with torch.no_grad():
        out = model(source, target)
        torch.testing.assert_close(model(source, changed_target)[:, :3], out[:, :3], atol=1e-5, rtol=1e-5)
        # every decoder position reads the whole source, the last source position included
        assert not torch.allclose(model(changed_source, target)[:, 0], out[:, 0])


def test_non_autoregressive_decoder_sees_later_targets():
    torch.manual_seed(0)
    model = EncoderDecoder(D, 1, 1, HEADS, AttentionSlots("vanilla", "NC"), autoregressive=False).eval()
    source, target = torch.randn(1, 8, D), torch.randn(1, 5, D)
    changed = target.clone()
    changed[:, 4] = torch.randn(D)
    with torch.no_grad():
        assert not torch.allclose(model(source, target)[:, 0], model(source, changed)[:, 0])


def test_parameter_counts_split_the_tested_attention_from_the_backbone():
    def decoder(attention, hparams=None):
        torch.manual_seed(0)
        return Decoder(D, 2, HEADS, AttentionSlots(attention, "CS", hparams or {}))

    exact = count_parameters(decoder("sdpa"))
    layer = 4 * (D * D + D) + 2 * (4 * D * D) + 4 * D + D + 2 * (2 * D)  # projections, MLP, two norms
    assert exact.total == exact.backbone == 2 * layer + 2 * D and exact.attention == 0
    assert not exact.flagged and exact.overhead == 0.0
    abc = count_parameters(decoder("abc", {"num_slots": 4}))
    own = sum(p.numel() for m in decoder("abc", {"num_slots": 4}).modules() if getattr(m, "cab_tested", False)
              for p in m.parameters())
    assert abc.attention == own > 0
    assert abc.backbone == exact.backbone and abc.total == exact.total + own
    assert abc.overhead == pytest.approx(own / exact.backbone)
    assert abc.flagged == (own / exact.backbone > 0.10)
    assert abc.metrics() == {"params_total": abc.total, "params_attention": own, "params_backbone": exact.backbone,
                             "param_overhead": abc.overhead, "param_flag": abc.flagged}


def test_parameter_flag_at_ten_percent():
    class Tiny(nn.Module):
        def __init__(self, extra):
            super().__init__()
            self.body = nn.Linear(10, 10, bias=False)  # 100 backbone parameters
            self.attention = nn.Linear(extra, 1, bias=False)
            self.attention.cab_tested = True

    assert not count_parameters(Tiny(10)).flagged
    assert count_parameters(Tiny(11)).flagged
