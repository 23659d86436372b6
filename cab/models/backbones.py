"""The three backbones of cab's tasks, each a stack of `cab.models.layers.Layer` whose attentions come from
`AttentionSlots`: an encoder (NS), a decoder-only stack (CS) and an encoder-decoder (NS encoder; decoder
with CS self and CC cross attention when autoregressive, NS self and NC cross attention otherwise).

Backbones take embedded inputs (B, L, d_model) and return hidden states; each task adds its own
embedding and output head, identical for every attention."""

from __future__ import annotations

import torch
from torch import nn

from cab.models.layers import Stack
from cab.models.slots import AttentionSlots
from cab.patterns import Pattern


class Encoder(nn.Module):
    """Bidirectional stack: every layer's self attention is noncausal self (NS)."""

    patterns = (Pattern.NS,)

    def __init__(self, d_model: int, num_layers: int, num_heads: int, slots: AttentionSlots, mlp_ratio: int = 4):
        super().__init__()
        self.stack = Stack(d_model, num_layers, num_heads, slots, Pattern.NS, mlp_ratio=mlp_ratio)

    def forward(self, x: torch.Tensor, padding_mask: "torch.Tensor | None" = None) -> torch.Tensor:
        return self.stack(x, padding_mask)


class Decoder(nn.Module):
    """Decoder-only (language-model) stack: every layer's self attention is causal self (CS)."""

    patterns = (Pattern.CS,)

    def __init__(self, d_model: int, num_layers: int, num_heads: int, slots: AttentionSlots, mlp_ratio: int = 4):
        super().__init__()
        self.stack = Stack(d_model, num_layers, num_heads, slots, Pattern.CS, mlp_ratio=mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stack(x)


class EncoderDecoder(nn.Module):
    """Encoder over the source, decoder over the target that cross-attends to the encoder's output.

    autoregressive=True: decoder self attention CS, cross attention CC (query-side causal: decoding one
    target position at a time gives the same outputs). autoregressive=False: NS and NC (all target
    positions predicted at once)."""

    def __init__(self, d_model: int, encoder_layers: int, decoder_layers: int, num_heads: int,
                 slots: AttentionSlots, autoregressive: bool = True, mlp_ratio: int = 4):
        super().__init__()
        self.autoregressive = autoregressive
        self_pattern, cross_pattern = (Pattern.CS, Pattern.CC) if autoregressive else (Pattern.NS, Pattern.NC)
        self.patterns = tuple(dict.fromkeys((Pattern.NS, self_pattern, cross_pattern)))
        self.encoder = Stack(d_model, encoder_layers, num_heads, slots, Pattern.NS, mlp_ratio=mlp_ratio)
        self.decoder = Stack(d_model, decoder_layers, num_heads, slots, self_pattern, cross_pattern, mlp_ratio)

    def encode(self, source: torch.Tensor, source_padding_mask: "torch.Tensor | None" = None) -> torch.Tensor:
        return self.encoder(source, source_padding_mask)

    def decode(self, target: torch.Tensor, memory: torch.Tensor,
               memory_padding_mask: "torch.Tensor | None" = None) -> torch.Tensor:
        return self.decoder(target, memory=memory, memory_padding_mask=memory_padding_mask)

    def forward(self, source: torch.Tensor, target: torch.Tensor,
                source_padding_mask: "torch.Tensor | None" = None) -> torch.Tensor:
        memory = self.encode(source, source_padding_mask)
        return self.decode(target, memory, source_padding_mask)
