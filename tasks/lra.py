"""Long Range Arena's byte-level text classification and document retrieval (Tay et al. 2021), noncausal
self attention, loaded through `datasets`: for machines that reach the hub, or from local files.

`lra_text`: IMDb reviews as UTF-8 bytes truncated to `max_length` (LRA: 4,000 in the paper), binary
sentiment; default source the hub's "stanfordnlp/imdb". `lra_retrieval`: pairs of ACL Anthology (AAN)
papers, each truncated to `max_length` bytes, labelled 1 when one cites the other; LRA's files are
tab-separated `label id1 id2 text1 text2` rows without a header (new_aan_pairs.{train,test}.tsv in
lra_release), given as `data_files`. Retrieval uses LRA's two-tower set-up: one encoder for both
documents, mean pooling, a classifier over [u, v, u * v, u - v].

Metric: `accuracy` on the test split (higher is better).
"""

from __future__ import annotations

import csv
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from cab.patterns import Pattern
from cab.tasks import Metric, MissingData, Task, TaskParams, register_task

from ._data import encode_bytes, load_hub_dataset
from ._heads import SequenceClassifier, SequenceEncoder, pad_sequences

PAD = 0
VOCAB = 257  # bytes shifted by one, 0 is padding


def byte_tokens(text: str, max_length: int) -> torch.Tensor:
    """UTF-8 bytes + 1 (0 is padding), truncated to `max_length`."""
    return encode_bytes(text)[:max_length].long() + 1


class LRAParams(TaskParams):
    dataset: str = Field("stanfordnlp/imdb", description="hub name, or a `datasets` builder with data_files")
    data_files: "dict[str, str | list[str]] | None" = None
    max_length: int = Field(4000, ge=1)
    max_train_examples: "int | None" = Field(None, ge=1)
    max_test_examples: "int | None" = Field(None, ge=1)


class LRAClassification(Task):
    """Shared loading, batching and evaluation of the LRA byte-level tasks (subclasses read the rows)."""

    backbones = {Pattern.NS: "bidirectional encoder, mean pooling, classifier"}
    metrics = (Metric("accuracy", True, "fraction of test examples classified right"),)

    def rows(self, split: str) -> "tuple[list, list[int]]":
        """(examples, labels) of a split; an example is one token tensor or a pair of them."""
        raise NotImplementedError

    def _load(self, split: str, limit: "int | None", **kwargs: Any) -> Any:
        files = self.params.data_files
        if files is not None and split not in files:
            raise MissingData(f"{self.name}: data_files has no {split!r} split (it has {', '.join(files)})")
        dataset = load_hub_dataset(self.params.dataset, split=split,
                                   data_files=None if files is None else {split: files[split]}, **kwargs)
        return dataset if limit is None else dataset.select(range(min(limit, len(dataset))))

    def lengths(self, pattern: Pattern) -> "tuple[int, int]":
        return self.params.max_length, self.params.max_length

    def prepare(self) -> dict:
        (train, train_labels), (test, test_labels) = self.rows("train"), self.rows("test")
        return {"train": (train, torch.tensor(train_labels)), "test": (test, torch.tensor(test_labels))}

    def batch(self, data: dict, generator: torch.Generator, device: torch.device) -> tuple:
        examples, labels = data["train"]
        picks = torch.randint(len(examples), (self.params.batch_size,), generator=generator).tolist()
        return self._collate([examples[i] for i in picks], device) + (labels[picks].to(device),)

    def _collate(self, examples: list, device: torch.device) -> tuple:
        tokens, padding = pad_sequences(examples, PAD)
        return tokens.to(device), padding.to(device)

    def loss(self, model: nn.Module, batch: tuple) -> torch.Tensor:
        *inputs, labels = batch
        return F.cross_entropy(model(*inputs), labels)

    def evaluate(self, model: nn.Module, data: dict, device: torch.device) -> dict:
        examples, labels = data["test"]
        correct, size = 0, self.params.eval_batch_size
        for start in range(0, len(examples), size):
            logits = model(*self._collate(examples[start:start + size], device))
            correct += int((logits.argmax(-1).cpu() == labels[start:start + size]).sum())
        return {"accuracy": correct / len(examples)}

    def chance(self, data: dict) -> dict:
        """`accuracy`: always answering the test split's most frequent label."""
        labels = data["test"][1]
        return {"accuracy": float(torch.bincount(labels).max()) / len(labels)}


@register_task
class LRAText(LRAClassification):
    name = "lra_text"
    description = "LRA byte-level text classification (IMDb) through `datasets` (NS)"
    data_source = "IMDb (Maas et al. 2011) from the dataset hub or local files"
    Params = LRAParams

    def rows(self, split: str) -> "tuple[list, list[int]]":
        limit = self.params.max_train_examples if split == "train" else self.params.max_test_examples
        dataset = self._load(split, limit)
        return [byte_tokens(r["text"], self.params.max_length) for r in dataset], [int(r["label"]) for r in dataset]

    def build_model(self, pattern: Pattern, slots: Any) -> nn.Module:
        return SequenceClassifier(VOCAB, 2, self.params, slots)


class RetrievalParams(LRAParams):
    dataset: str = "csv"
    column_names: list[str] = Field(default_factory=lambda: ["label", "id1", "id2", "text1", "text2"])


class DualEncoder(nn.Module):
    """LRA's retrieval model: one encoder for both documents, then an MLP over [u, v, u * v, u - v]."""

    def __init__(self, params: TaskParams, slots: Any, classes: int = 2):
        super().__init__()
        self.encoder = SequenceEncoder(VOCAB, params, slots)
        d = params.d_model
        self.head = nn.Sequential(nn.Linear(4 * d, d), nn.GELU(), nn.Linear(d, classes))

    def forward(self, first: torch.Tensor, first_padding: torch.Tensor, second: torch.Tensor,
                second_padding: torch.Tensor) -> torch.Tensor:
        u, v = self.encoder(first, first_padding), self.encoder(second, second_padding)
        return self.head(torch.cat([u, v, u * v, u - v], dim=-1))


@register_task
class LRARetrieval(LRAClassification):
    name = "lra_retrieval"
    description = "LRA document retrieval (AAN citation pairs) from LRA's TSV files through `datasets` (NS)"
    data_source = "ACL Anthology Network pairs of lra_release (new_aan_pairs.*.tsv), given as data_files"
    Params = RetrievalParams

    def rows(self, split: str) -> "tuple[list, list[int]]":
        if self.params.data_files is None:
            raise MissingData("lra_retrieval needs data_files={'train': ..., 'test': ...}: the TSV files of "
                              "lra_release/tsv_data (new_aan_pairs.train.tsv, new_aan_pairs.test.tsv)")
        limit = self.params.max_train_examples if split == "train" else self.params.max_test_examples
        dataset = self._load(split, limit, delimiter="\t", column_names=self.params.column_names,
                             quoting=csv.QUOTE_NONE)
        pairs = [(byte_tokens(str(r["text1"]), self.params.max_length),
                  byte_tokens(str(r["text2"]), self.params.max_length)) for r in dataset]
        return pairs, [int(float(r["label"])) for r in dataset]

    def _collate(self, examples: list, device: torch.device) -> tuple:
        return (super()._collate([a for a, _ in examples], device)
                + super()._collate([b for _, b in examples], device))

    def build_model(self, pattern: Pattern, slots: Any) -> nn.Module:
        return DualEncoder(self.params, slots)
