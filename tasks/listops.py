"""ListOps (Nangia & Bowman 2018, as generated for Long Range Arena, Tay et al. 2021): noncausal self
attention over nested list operations, 10-way classification of the expression's value.

The generator is LRA's (`lra_benchmarks/data/listops.py`) rewritten with a seeded `random.Random`:
operators MIN, MAX, MED (median, rounded down) and SM (sum modulo 10) over the digits 0-9; a node is a
value with probability 0.75 below `max_depth`; an operator takes 2 to `max_args` arguments; expressions
are kept when their token count lies in [min_length, max_length]. Token count as in LRA: one per
operator, one per closing bracket, one per digit. Train and test sets are generated once per parameter
set from `data_seed` and cached on disk.

Metric: `accuracy` on the test set (higher is better).
"""

from __future__ import annotations

import random
import statistics
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from cab.patterns import Pattern
from cab.tasks import Metric, Task, TaskParams, register_task

from ._data import cached
from ._heads import SequenceClassifier, classification_accuracy, pad_sequences

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
END = "]"
VALUE_PROBABILITY = 0.75  # LRA: a node below the maximum depth is a value when random() > VALUE_P = 0.25
PAD = 0
TOKENS = {token: i + 1 for i, token in enumerate((END,) + OPERATORS + tuple(str(d) for d in range(10)))}
VOCAB = len(TOKENS) + 1

Tree = Any  # an int (a digit) or (operator, [subtrees])


def generate_tree(rng: random.Random, depth: int, max_depth: int, max_args: int) -> "tuple[Tree, int]":
    """A random expression and its token count (LRA's generate_tree)."""
    if depth >= max_depth or rng.random() < VALUE_PROBABILITY:
        return rng.randrange(10), 1
    arguments, length = [], 2  # the operator and its closing bracket
    for _ in range(rng.randint(2, max_args)):
        subtree, sub_length = generate_tree(rng, depth + 1, max_depth, max_args)
        arguments.append(subtree)
        length += sub_length
    return (rng.choice(OPERATORS), arguments), length


def evaluate_tree(tree: Tree) -> int:
    """The value of an expression (MED: the median rounded down, as LRA's int(np.median(...)))."""
    if isinstance(tree, int):
        return tree
    operator, arguments = tree
    values = [evaluate_tree(a) for a in arguments]
    if operator == "[MIN":
        return min(values)
    if operator == "[MAX":
        return max(values)
    if operator == "[MED":
        return int(statistics.median(values))
    return sum(values) % 10


def tree_tokens(tree: Tree) -> "list[str]":
    """The expression as tokens: '[MAX', '2', '9', ']' for [MAX 2 9 ]."""
    if isinstance(tree, int):
        return [str(tree)]
    operator, arguments = tree
    return [operator] + [t for a in arguments for t in tree_tokens(a)] + [END]


def generate_listops(count: int, seed: int, min_length: int, max_length: int, max_depth: int,
                     max_args: int) -> "tuple[list[list[str]], list[int]]":
    """`count` expressions (as tokens; duplicates possible) with their values, from a seeded generator."""
    rng = random.Random(seed)
    sequences, labels = [], []
    while len(sequences) < count:
        tree, length = generate_tree(rng, 1, max_depth, max_args)
        if min_length <= length <= max_length:
            sequences.append(tree_tokens(tree))
            labels.append(evaluate_tree(tree))
    return sequences, labels


class ListOpsParams(TaskParams):
    min_length: int = Field(32, ge=1)
    max_length: int = Field(128, ge=1)
    max_depth: int = Field(6, ge=2)
    max_args: int = Field(5, ge=2)
    train_examples: int = Field(8000, ge=1)
    test_examples: int = Field(1000, ge=1)

    @model_validator(mode="after")
    def _length_range(self) -> "ListOpsParams":
        if self.min_length > self.max_length:
            raise ValueError(f"min_length ({self.min_length}) exceeds max_length ({self.max_length})")
        return self


@register_task
class ListOps(Task):
    name = "listops"
    description = "ListOps from Long Range Arena, seeded and cached (NS)"
    data_source = "synthetic (LRA's ListOps generator with a seeded random.Random)"
    backbones = {Pattern.NS: "bidirectional encoder, mean pooling, linear classifier"}
    metrics = (Metric("accuracy", True, "fraction of test expressions whose value (0-9) is predicted"),)
    Params = ListOpsParams

    def lengths(self, pattern: Pattern) -> "tuple[int, int]":
        return self.params.max_length, self.params.max_length

    def _split(self, count: int, seed: int) -> dict:
        p = self.params
        key = {"count": count, "seed": seed, "min_length": p.min_length, "max_length": p.max_length,
               "max_depth": p.max_depth, "max_args": p.max_args, "version": 1}

        def build() -> dict:
            sequences, labels = generate_listops(count, seed, p.min_length, p.max_length, p.max_depth, p.max_args)
            return {"tokens": [torch.tensor([TOKENS[t] for t in s], dtype=torch.uint8) for s in sequences],
                    "labels": torch.tensor(labels, dtype=torch.long)}

        return cached("listops", key, build)

    def prepare(self) -> dict:
        seed = self.params.data_seed
        return {"train": self._split(self.params.train_examples, seed),
                "test": self._split(self.params.test_examples, seed + 1)}

    def build_model(self, pattern: Pattern, slots: Any) -> torch.nn.Module:
        return SequenceClassifier(VOCAB, 10, self.params, slots)

    def batch(self, data: dict, generator: torch.Generator, device: torch.device) -> tuple:
        train = data["train"]
        picks = torch.randint(len(train["labels"]), (self.params.batch_size,), generator=generator).tolist()
        tokens, padding = pad_sequences([train["tokens"][i].long() for i in picks], PAD)
        return tokens.to(device), padding.to(device), train["labels"][picks].to(device)

    def loss(self, model: torch.nn.Module, batch: tuple) -> torch.Tensor:
        tokens, padding, labels = batch
        return F.cross_entropy(model(tokens, padding), labels)

    def evaluate(self, model: torch.nn.Module, data: dict, device: torch.device) -> dict:
        test = data["test"]
        tokens = [t.long() for t in test["tokens"]]
        return {"accuracy": classification_accuracy(model, tokens, test["labels"], self.params.eval_batch_size,
                                                    device, PAD)}

    def chance(self, data: dict) -> dict:
        """`accuracy`: always answering the test set's most frequent value; `accuracy_uniform`: 1/10."""
        labels = data["test"]["labels"]
        return {"accuracy": float(torch.bincount(labels, minlength=10).max()) / len(labels), "accuracy_uniform": 0.1}
