"""The building blocks shared by every backbone: embeddings, sinusoidal positions, multi-head attention
around a registry attention, the feed-forward block and the pre-norm Transformer layer.

Only the attention inside `MultiHeadAttention` differs between runs; projections, norms, MLPs and
positions are the same modules for every attention."""

from __future__ import annotations

import math

import torch
from torch import nn

from cab.models.slots import AttentionSlots
from cab.patterns import Pattern


def sinusoidal_positions(length: int, d_model: int, device: "torch.device | str | None" = None) -> torch.Tensor:
    """(length, d_model) fixed sine/cosine positions (Vaswani et al. 2017): defined at any length, so a
    model trained at L can be evaluated at 8L."""
    position = torch.arange(length, dtype=torch.float32, device=device).unsqueeze(1)
    freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32, device=device) * (-math.log(10000.0) / d_model))
    table = torch.zeros(length, d_model, device=device)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq[: d_model // 2])
    return table


class TokenEmbedding(nn.Module):
    """Token ids (B, L) -> (B, L, d_model). Initialised N(0, 1), the scale of the sinusoidal positions, so
    neither drowns the other (position-based attention such as a previous-token head stays learnable)."""

    def __init__(self, vocab_size: int, d_model: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed(tokens)


class FeatureEmbedding(nn.Module):
    """Continuous features (B, L, F) -> (B, L, d_model) by a linear map (time series)."""

    def __init__(self, num_features: int, d_model: int):
        super().__init__()
        self.proj = nn.Linear(num_features, d_model)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features)


class MultiHeadAttention(nn.Module):
    """Query/key/value projections, the slot's attention on (B, H, L, D) heads, output projection."""

    def __init__(self, d_model: int, num_heads: int, pattern: "Pattern | str", slots: AttentionSlots):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be a multiple of num_heads ({num_heads})")
        self.num_heads, self.head_dim = num_heads, d_model // num_heads
        self.q_proj, self.k_proj = nn.Linear(d_model, d_model), nn.Linear(d_model, d_model)
        self.v_proj, self.out_proj = nn.Linear(d_model, d_model), nn.Linear(d_model, d_model)
        self.attention = slots.build(pattern, num_heads, self.head_dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape
        return x.view(b, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, memory: "torch.Tensor | None" = None,
                key_padding_mask: "torch.Tensor | None" = None) -> torch.Tensor:
        """Self attention over x, or cross attention from x to `memory`; the mask marks padded keys."""
        source = x if memory is None else memory
        q, k, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(source)), self._heads(self.v_proj(source))
        out = self.attention(q, k, v, key_padding_mask=key_padding_mask)
        return self.out_proj(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


class FeedForward(nn.Module):
    """Position-wise MLP: Linear, GELU, Linear."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(), nn.Linear(hidden, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Layer(nn.Module):
    """Pre-norm Transformer layer: self attention, optional cross attention to a memory, feed-forward."""

    def __init__(self, d_model: int, num_heads: int, slots: AttentionSlots, self_pattern: "Pattern | str",
                 cross_pattern: "Pattern | str | None" = None, mlp_ratio: int = 4):
        super().__init__()
        self.self_norm = nn.LayerNorm(d_model)
        self.self_attn = MultiHeadAttention(d_model, num_heads, self_pattern, slots)
        self.cross_norm = nn.LayerNorm(d_model) if cross_pattern is not None else None
        self.cross_attn = MultiHeadAttention(d_model, num_heads, cross_pattern, slots) if cross_pattern else None
        self.ff_norm = nn.LayerNorm(d_model)
        self.ff = FeedForward(d_model, mlp_ratio * d_model)

    def forward(self, x: torch.Tensor, padding_mask: "torch.Tensor | None" = None,
                memory: "torch.Tensor | None" = None, memory_padding_mask: "torch.Tensor | None" = None,
                ) -> torch.Tensor:
        x = x + self.self_attn(self.self_norm(x), key_padding_mask=padding_mask)
        if self.cross_attn is not None:
            if memory is None:
                raise ValueError("a layer with cross attention needs a memory")
            x = x + self.cross_attn(self.cross_norm(x), memory, key_padding_mask=memory_padding_mask)
        return x + self.ff(self.ff_norm(x))


class Stack(nn.Module):
    """Sinusoidal positions, `num_layers` layers and a final LayerNorm."""

    def __init__(self, d_model: int, num_layers: int, num_heads: int, slots: AttentionSlots,
                 self_pattern: "Pattern | str", cross_pattern: "Pattern | str | None" = None, mlp_ratio: int = 4):
        super().__init__()
        self.d_model = d_model
        self.layers = nn.ModuleList(
            Layer(d_model, num_heads, slots, self_pattern, cross_pattern, mlp_ratio) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, padding_mask: "torch.Tensor | None" = None,
                memory: "torch.Tensor | None" = None, memory_padding_mask: "torch.Tensor | None" = None,
                ) -> torch.Tensor:
        x = x + sinusoidal_positions(x.shape[1], self.d_model, x.device).to(x.dtype)
        for layer in self.layers:
            x = layer(x, padding_mask, memory, memory_padding_mask)
        return self.norm(x)
