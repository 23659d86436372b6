"""Multi-query associative recall (MQAR, after Arora et al. 2023, "Zoology"): synthetic, seeded.

A sequence of `length` positions starts with n key-value pairs (distinct keys); the later positions are
queries (all of them, or `queries` random ones with filler between): one of the n keys again (drawn with
replacement), where the model must output the value bound to it. Two bindings of key and value:
- adjacent: the key token, then its value token (Zoology's MQAR). Answering needs an induction circuit
  (a previous-token head, then a content match), which small models take thousands of steps to form;
- joint: key and value at one position (the position's input is the key's embedding plus the value's),
  a one-hop associative memory that small models learn in a few hundred steps (the quick config).
CS runs a decoder-only model (queries come after the pairs); NS runs the same data through a
bidirectional encoder (the answers are nowhere in the input, so seeing the future does not help).

Training draws n uniformly from `pairs` for each batch; evaluation scores a fixed held-out set per n,
so recall capacity is visible as accuracy against the number of pairs.

Metrics: `accuracy` (mean over the pair counts of the fraction of queries answered correctly, higher is
better) and `accuracy_by_pairs` (a list of {pairs, accuracy}).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from cab.models import Decoder, Encoder, TokenEmbedding
from cab.patterns import Pattern
from cab.tasks import Metric, Task, TaskParams, register_task

FILLER = 0
IGNORE = -100


class RecallParams(TaskParams):
    length: int = Field(128, ge=4)
    pairs: list[int] = Field(default_factory=lambda: [4, 8, 16], min_length=1)
    key_vocab: int = Field(32, ge=1)
    value_vocab: int = Field(32, ge=2)
    binding: Literal["adjacent", "joint"] = Field("adjacent", description="adjacent: a key token then its value "
                                                  "token (Zoology's MQAR); joint: key and value at one position")
    queries: "int | None" = Field(None, ge=1, description="query positions per sequence (at random after the "
                                                        "pairs, filler elsewhere); None: every position")
    eval_examples: int = Field(256, ge=1, description="held-out sequences per pair count")

    @model_validator(mode="after")
    def _fits(self) -> "RecallParams":
        per_pair = 2 if self.binding == "adjacent" else 1
        for n in self.pairs:
            if n < 1 or n > self.key_vocab or (per_pair + 1) * n > self.length:
                raise ValueError(f"pairs must be between 1 and key_vocab ({self.key_vocab}) and leave at least as "
                                 f"many query positions in length ({self.length}); got {n}")
        return self


def make_recall(batch: int, params: RecallParams, pairs: int, generator: torch.Generator,
                ) -> "tuple[torch.Tensor, torch.Tensor, torch.Tensor]":
    """(tokens, bound, targets) of `batch` MQAR sequences: `pairs` key-value pairs (distinct keys), then
    queries of the stored keys (drawn with replacement): at every later position, or at `queries` random
    ones with the filler token 0 between them.

    tokens: keys 1..key_vocab, and with adjacent binding the value tokens key_vocab+1.. after their keys;
    bound: with joint binding, value + 1 at each key's position (0 elsewhere, and everywhere for adjacent);
    targets: the value (0..value_vocab-1) at every query, IGNORE elsewhere."""
    p = params
    keys = torch.rand(batch, p.key_vocab, generator=generator).argsort(dim=1)[:, :pairs] + 1
    values = torch.randint(p.value_vocab, (batch, pairs), generator=generator)
    if p.binding == "adjacent":
        stored = torch.stack([keys, values + p.key_vocab + 1], dim=2).flatten(1)
        bound = torch.zeros(batch, p.length, dtype=torch.long)
    else:
        stored = keys
        bound = F.pad(values + 1, (0, p.length - pairs))
    rest = p.length - stored.shape[1]
    count = rest if p.queries is None else min(p.queries, rest)
    asked = torch.randint(pairs, (batch, count), generator=generator)
    positions = torch.rand(batch, rest, generator=generator).argsort(dim=1)[:, :count].sort(dim=1).values
    queries = torch.full((batch, rest), FILLER, dtype=torch.long).scatter_(1, positions, keys.gather(1, asked))
    answers = torch.full((batch, rest), IGNORE, dtype=torch.long).scatter_(1, positions, values.gather(1, asked))
    return torch.cat([stored, queries], dim=1), bound, torch.cat([torch.full_like(stored, IGNORE), answers], dim=1)


class RecallModel(nn.Module):
    """Token embedding plus bound-value embedding, a decoder (CS) or encoder (NS), a head over the values."""

    def __init__(self, params: RecallParams, slots: Any, causal: bool):
        super().__init__()
        self.embed = TokenEmbedding(1 + params.key_vocab + params.value_vocab, params.d_model)
        self.embed_bound = TokenEmbedding(1 + params.value_vocab, params.d_model)
        backbone = Decoder if causal else Encoder
        self.backbone = backbone(params.d_model, params.layers, params.heads, slots, params.mlp_ratio)
        self.head = nn.Linear(params.d_model, params.value_vocab)

    def forward(self, tokens: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(self.embed(tokens) + self.embed_bound(bound)))


@register_task
class AssociativeRecall(Task):
    name = "recall"
    description = "multi-query associative recall over a sweep of key-value pair counts (CS and NS)"
    data_source = "synthetic (seeded generator, after Zoology's MQAR)"
    backbones = {Pattern.CS: "decoder-only Transformer", Pattern.NS: "bidirectional encoder"}
    metrics = (
        Metric("accuracy", True, "fraction of queries answered with the right value, mean over pair counts"),
        Metric("accuracy_by_pairs", True, "list of {pairs, accuracy}: accuracy per number of key-value pairs",
               index=False),
    )
    Params = RecallParams

    def lengths(self, pattern: Pattern) -> "tuple[int, int]":
        return self.params.length, self.params.length

    def _make(self, batch: int, pairs: int, generator: torch.Generator) -> "tuple[torch.Tensor, ...]":
        return make_recall(batch, self.params, pairs, generator)

    def prepare(self) -> dict:
        generator = torch.Generator().manual_seed(self.params.data_seed)
        return {"test": {n: self._make(self.params.eval_examples, n, generator) for n in self.params.pairs}}

    def build_model(self, pattern: Pattern, slots: Any) -> nn.Module:
        return RecallModel(self.params, slots, causal=pattern is Pattern.CS)

    def batch(self, data: dict, generator: torch.Generator, device: torch.device) -> "tuple[torch.Tensor, ...]":
        pick = int(torch.randint(len(self.params.pairs), (1,), generator=generator))
        return tuple(t.to(device) for t in self._make(self.params.batch_size, self.params.pairs[pick], generator))

    def loss(self, model: nn.Module, batch: "tuple[torch.Tensor, ...]") -> torch.Tensor:
        tokens, bound, targets = batch
        return F.cross_entropy(model(tokens, bound).flatten(0, 1), targets.flatten(), ignore_index=IGNORE)

    def evaluate(self, model: nn.Module, data: dict, device: torch.device) -> dict:
        curve = []
        size = self.params.eval_batch_size
        for n, (tokens, bound, targets) in data["test"].items():
            correct = total = 0
            for start in range(0, len(tokens), size):
                x, b, y = (t[start:start + size].to(device) for t in (tokens, bound, targets))
                asked = y != IGNORE
                correct += int((model(x, b).argmax(-1) == y)[asked].sum())
                total += int(asked.sum())
            curve.append({"pairs": n, "accuracy": correct / total})
        return {"accuracy": sum(p["accuracy"] for p in curve) / len(curve), "accuracy_by_pairs": curve}

    def chance(self, data: dict) -> dict:
        """`accuracy`: guessing one of the n values present in the sequence (1/n, averaged over the pair
        counts); `accuracy_uniform`: guessing among all values (1/value_vocab)."""
        pairs = self.params.pairs
        return {"accuracy": sum(1.0 / n for n in pairs) / len(pairs), "accuracy_uniform": 1.0 / self.params.value_vocab}
