"""Models shared by several tasks: an embedding, a cab backbone and an output head. The same modules are
built for every attention; only the backbone's attention slots differ."""

from __future__ import annotations

import torch
from torch import nn

from cab.models import AttentionSlots, Decoder, Encoder, TokenEmbedding
from cab.tasks import TaskParams


class TokenTagger(nn.Module):
    """Tokens -> per-position logits: an encoder (NS) or a decoder-only stack (CS) with a linear head."""

    def __init__(self, vocab_size: int, num_outputs: int, params: TaskParams, slots: AttentionSlots, causal: bool):
        super().__init__()
        self.embed = TokenEmbedding(vocab_size, params.d_model)
        backbone = Decoder if causal else Encoder
        self.backbone = backbone(params.d_model, params.layers, params.heads, slots, params.mlp_ratio)
        self.head = nn.Linear(params.d_model, num_outputs)
        self.causal = causal

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(self.embed(tokens)))


def masked_mean(hidden: torch.Tensor, padding_mask: "torch.Tensor | None") -> torch.Tensor:
    """Mean of (B, L, D) over the real (not padded) positions."""
    if padding_mask is None:
        return hidden.mean(dim=1)
    keep = (~padding_mask).unsqueeze(-1).to(hidden.dtype)
    return (hidden * keep).sum(dim=1) / keep.sum(dim=1).clamp_min(1.0)


class SequenceEncoder(nn.Module):
    """Tokens -> one vector per sequence: embedding, encoder (NS), mean over the real positions."""

    def __init__(self, vocab_size: int, params: TaskParams, slots: AttentionSlots):
        super().__init__()
        self.embed = TokenEmbedding(vocab_size, params.d_model)
        self.backbone = Encoder(params.d_model, params.layers, params.heads, slots, params.mlp_ratio)

    def forward(self, tokens: torch.Tensor, padding_mask: "torch.Tensor | None" = None) -> torch.Tensor:
        return masked_mean(self.backbone(self.embed(tokens), padding_mask), padding_mask)


class SequenceClassifier(nn.Module):
    """Tokens -> class logits (LRA's classification set-up: encoder, mean pooling, linear head)."""

    def __init__(self, vocab_size: int, num_classes: int, params: TaskParams, slots: AttentionSlots):
        super().__init__()
        self.encoder = SequenceEncoder(vocab_size, params, slots)
        self.head = nn.Linear(params.d_model, num_classes)

    def forward(self, tokens: torch.Tensor, padding_mask: "torch.Tensor | None" = None) -> torch.Tensor:
        return self.head(self.encoder(tokens, padding_mask))


def pad_sequences(sequences: "list[torch.Tensor]", pad_id: int = 0) -> "tuple[torch.Tensor, torch.Tensor]":
    """Right-pad 1-D token tensors to the longest: (tokens (B, L), padding_mask (B, L), True = padding)."""
    length = max(len(s) for s in sequences)
    tokens = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    padding = torch.ones(len(sequences), length, dtype=torch.bool)
    for i, seq in enumerate(sequences):
        tokens[i, : len(seq)] = seq
        padding[i, : len(seq)] = False
    return tokens, padding


def classification_accuracy(model: nn.Module, tokens: "list[torch.Tensor]", labels: torch.Tensor,
                            batch_size: int, device: torch.device, pad_id: int = 0) -> float:
    """Accuracy of a SequenceClassifier over a list of token sequences (padded per batch)."""
    correct = 0
    for start in range(0, len(tokens), batch_size):
        batch, padding = pad_sequences(tokens[start:start + batch_size], pad_id)
        logits = model(batch.to(device), padding.to(device))
        correct += int((logits.argmax(-1).cpu() == labels[start:start + batch_size]).sum())
    return correct / len(tokens)
