"""Key-value lookup as sequence to sequence: an autoregressive decoder cross-attends to a long source.

The source is `source_length` random noise tokens holding `pairs` (key, value) pairs with distinct keys,
bound as in the recall task: adjacent (a key token then its value token, at a random even position) or
joint (key and value at one random position). The decoder emits one value per step: its input at step t
is the t-th key asked (`queries` keys drawn from the stored ones with replacement) plus the value it
emitted at step t-1 (BOS at step 0), and it must output the value stored under the key, which its
causal cross attention (CC) has to find in the source; its causal self attention (CS) carries the
decoded prefix. Training uses teacher forcing; evaluation decodes greedily, feeding the model's own
values back.

Metrics: `exact_match` (fraction of test sequences whose values are all right) and `token_accuracy`
(fraction of values right); both higher is better.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from cab.models import EncoderDecoder, TokenEmbedding
from cab.patterns import Pattern
from cab.tasks import Metric, Task, TaskParams, register_task

KEY_BASE = 1  # source ids: 0 unused, keys, then values (adjacent binding), then noise
BOS_VALUE = 1  # decoder value ids: 0 none, 1 BOS, value + 2


class LookupParams(TaskParams):
    source_length: int = Field(128, ge=2)
    pairs: int = Field(8, ge=1)
    queries: int = Field(16, ge=1, description="keys asked per sequence (drawn with replacement)")
    key_vocab: int = Field(32, ge=1)
    value_vocab: int = Field(32, ge=2)
    noise_vocab: int = Field(16, ge=1)
    binding: Literal["adjacent", "joint"] = Field("adjacent", description="adjacent: a key token then its value "
                                                  "token in the source; joint: key and value at one position")
    eval_examples: int = Field(256, ge=1)

    @model_validator(mode="after")
    def _fits(self) -> "LookupParams":
        per_pair = 2 if self.binding == "adjacent" else 1
        if self.pairs > self.key_vocab or per_pair * self.pairs > self.source_length:
            raise ValueError(f"pairs ({self.pairs}) must be <= key_vocab ({self.key_vocab}) and fit in "
                             f"source_length ({self.source_length})")
        return self

    @property
    def vocab(self) -> int:
        return KEY_BASE + self.key_vocab + self.value_vocab + self.noise_vocab


def make_lookup(batch: int, params: LookupParams, generator: torch.Generator) -> "dict[str, torch.Tensor]":
    """source (B, Ls) and bound (B, Ls: value + 1 at a key's position with joint binding, else 0); the
    decoder's keys (B, m) and previous values (B, m: BOS, then each answer + 2, as fed back); the answers
    (B, m: value indices 0..value_vocab-1)."""
    p, n, m = params, params.pairs, params.queries
    value_base, noise_base = KEY_BASE + p.key_vocab, KEY_BASE + p.key_vocab + p.value_vocab
    source = torch.randint(p.noise_vocab, (batch, p.source_length), generator=generator) + noise_base
    bound = torch.zeros(batch, p.source_length, dtype=torch.long)
    keys = torch.rand(batch, p.key_vocab, generator=generator).argsort(dim=1)[:, :n] + KEY_BASE
    values = torch.randint(p.value_vocab, (batch, n), generator=generator)
    if p.binding == "adjacent":
        slots = 2 * torch.rand(batch, p.source_length // 2, generator=generator).argsort(dim=1)[:, :n]
        source.scatter_(1, slots + 1, values + value_base)
    else:
        slots = torch.rand(batch, p.source_length, generator=generator).argsort(dim=1)[:, :n]
        bound.scatter_(1, slots, values + 1)
    source.scatter_(1, slots, keys)
    asked = torch.randint(n, (batch, m), generator=generator)
    answers = values.gather(1, asked)
    previous = torch.cat([torch.full((batch, 1), BOS_VALUE, dtype=torch.long), answers[:, :-1] + 2], dim=1)
    return {"source": source, "bound": bound, "keys": keys.gather(1, asked), "previous": previous, "answers": answers}


class Seq2Seq(nn.Module):
    """Token embeddings of the source (plus bound values) and of the decoder (key asked plus the previous
    value), an autoregressive encoder-decoder, and a linear head over the values."""

    def __init__(self, params: LookupParams, slots: Any):
        super().__init__()
        self.embed = TokenEmbedding(params.vocab, params.d_model)
        self.embed_value = TokenEmbedding(2 + params.value_vocab, params.d_model)
        self.backbone = EncoderDecoder(params.d_model, params.layers, params.layers, params.heads, slots,
                                       autoregressive=True, mlp_ratio=params.mlp_ratio)
        self.head = nn.Linear(params.d_model, params.value_vocab)

    def encode(self, source: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
        return self.backbone.encode(self.embed(source) + self.embed_value(bound))

    def decode(self, keys: torch.Tensor, previous: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.decode(self.embed(keys) + self.embed_value(previous), memory))

    def forward(self, source: torch.Tensor, bound: torch.Tensor, keys: torch.Tensor,
                previous: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (B, m, value_vocab)."""
        return self.decode(keys, previous, self.encode(source, bound))

    @torch.no_grad()
    def generate(self, source: torch.Tensor, bound: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Greedy decoding (B, m): step t reads the keys up to t and the values this model emitted before."""
        memory = self.encode(source, bound)
        previous = torch.zeros_like(keys)
        previous[:, 0] = BOS_VALUE
        emitted = torch.empty_like(keys)
        for t in range(keys.shape[1]):
            emitted[:, t] = self.decode(keys, previous, memory)[:, t].argmax(-1)
            if t + 1 < keys.shape[1]:
                previous[:, t + 1] = emitted[:, t] + 2
        return emitted


@register_task
class Lookup(Task):
    name = "lookup"
    description = "sequence to sequence: emit the values stored under given keys in a long source (CS, CC)"
    data_source = "synthetic (seeded generator)"
    backbones = {Pattern.CS: "encoder-decoder, the decoder's causal self attention",
                 Pattern.CC: "encoder-decoder, the decoder's causal cross attention"}
    metrics = (
        Metric("exact_match", True, "fraction of test sequences with every value right (greedy decoding)"),
        Metric("token_accuracy", True, "fraction of values right (greedy decoding)"),
    )
    Params = LookupParams

    def lengths(self, pattern: Pattern) -> "tuple[int, int]":
        decoder = self.params.queries
        return (decoder, decoder) if pattern is Pattern.CS else (decoder, self.params.source_length)

    def prepare(self) -> dict:
        generator = torch.Generator().manual_seed(self.params.data_seed)
        return {"test": make_lookup(self.params.eval_examples, self.params, generator)}

    def build_model(self, pattern: Pattern, slots: Any) -> nn.Module:
        return Seq2Seq(self.params, slots)

    def batch(self, data: dict, generator: torch.Generator, device: torch.device) -> dict:
        return {k: v.to(device) for k, v in make_lookup(self.params.batch_size, self.params, generator).items()}

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        logits = model(batch["source"], batch["bound"], batch["keys"], batch["previous"])
        return F.cross_entropy(logits.flatten(0, 1), batch["answers"].flatten())

    def evaluate(self, model: nn.Module, data: dict, device: torch.device) -> dict:
        test, right = data["test"], []
        for start in range(0, len(test["source"]), self.params.eval_batch_size):
            part = {k: v[start:start + self.params.eval_batch_size].to(device) for k, v in test.items()}
            emitted = model.generate(part["source"], part["bound"], part["keys"])
            right.append((emitted == part["answers"]).cpu())
        correct = torch.cat(right)
        return {"exact_match": float(correct.all(dim=1).float().mean()),
                "token_accuracy": float(correct.float().mean())}

    def chance(self, data: dict) -> dict:
        """Guessing values uniformly: token accuracy 1/value_vocab, exact match (1/value_vocab)^queries."""
        token = 1.0 / self.params.value_vocab
        return {"token_accuracy": token, "exact_match": token ** self.params.queries}
