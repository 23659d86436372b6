"""The task protocol (`Task`, `TaskParams`, `Metric`), the task registry and the loader of the task modules
in the repository's `tasks/` folder.

A task declares the patterns it exercises and the backbone each uses, its metrics with their direction,
its parameters (training budget, model size, lengths) with defaults, and how to build its data, model,
batches, loss and evaluation. Adding a task means adding one module under `tasks/` that defines a `Task`
subclass decorated with `@register_task`. The folder is imported as the package `cab_tasks`, so task
modules share helpers with relative imports (`from ._data import ...`).

A task's `version` is raised whenever a change alters what it measures (data, model, training, metrics):
stored results of another version are then stale and run again. The `tasks:` section of grid configs
lives in `cab.training.expand`.
"""

from __future__ import annotations

import abc
import importlib
import importlib.util
import os
import pkgutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from cab.models import AttentionSlots
from cab.models.slots import DEFAULT_BASE
from cab.patterns import Pattern
from cab.registries import Registry, UnknownName, import_file

TASKS_PACKAGE = "cab_tasks"
TASKS_DIR_ENV = "CAB_TASKS_DIR"


class MissingData(FileNotFoundError):
    """A raw data file is not on this machine; the message names the command that fetches it."""


class UnknownTask(UnknownName):
    """A task name that is not registered; the message suggests near matches."""

    def __init__(self, name: str, known: "list[str]"):
        super().__init__("task", name, known, hint=f"registered: {', '.join(known) or 'none'}")


@dataclass(frozen=True)
class Metric:
    """One metric a task reports. `index`: it enters the compositional index (scalar metrics only);
    curves (lists of points) are stored for plots and never averaged into the index."""

    name: str
    higher_is_better: bool
    description: str
    index: bool = True

    @property
    def direction(self) -> int:
        """+1 when higher is better, -1 when lower is better (the sign in CAB's z-scores)."""
        return 1 if self.higher_is_better else -1


class TaskParams(BaseModel):
    """Parameters every task takes: the training budget, the model size and the base attention that fills
    the slots of the patterns not under test. Tasks subclass this with their own fields and defaults."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    steps: int = Field(300, ge=0, description="optimizer steps")
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-3, gt=0)
    warmup: float = Field(0.05, ge=0, lt=1, description="fraction of the steps with a linear warm-up")
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    d_model: int = Field(64, ge=1)
    layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    mlp_ratio: int = Field(4, ge=1)
    eval_batch_size: int = Field(32, ge=1)
    base_attention: str = Field(DEFAULT_BASE, description="attention of the slots of the other patterns")
    data_seed: int = Field(1234, ge=0, description="seed of generated data and splits (the same for every "
                                                    "training seed, so seeds differ only in training)")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "TaskParams":
        if self.d_model % self.heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of heads ({self.heads})")
        return self


class Task(abc.ABC):
    """A long-sequence task: data, a backbone with attention slots per pattern, a loss and an evaluation.

    Subclasses set the class attributes and implement the methods; `Params` is their TaskParams subclass.
    `prepare` builds (or reads from the cache) everything that depends only on the parameters, never on
    the training seed; `batch` draws one training batch with the seed's generator."""

    name: ClassVar[str] = ""
    version: ClassVar[int] = 1  # raised whenever a change alters what the task measures
    description: ClassVar[str] = ""
    data_source: ClassVar[str] = ""  # where the data comes from, and its licence where it matters
    backbones: ClassVar[dict] = {}  # Pattern -> the backbone that pattern's runs use, in words
    metrics: ClassVar[tuple] = ()  # Metric, the first is the primary one
    Params: ClassVar[type] = TaskParams

    def __init__(self, params: "TaskParams | dict | None" = None):
        if params is None or isinstance(params, dict):
            params = self.Params.model_validate(params or {})
        if not isinstance(params, self.Params):
            raise TypeError(f"task {self.name!r} takes {self.Params.__name__}, got {type(params).__name__}")
        self.params = params

    @classmethod
    def patterns(cls) -> "tuple[Pattern, ...]":
        return tuple(cls.backbones)

    @classmethod
    def metric(cls, name: str) -> Metric:
        for metric in cls.metrics:
            if metric.name == name:
                return metric
        raise KeyError(f"task {cls.name!r} has no metric {name!r}")

    def slots(self, attention: str, pattern: "Pattern | str", hparams: "dict | None" = None) -> AttentionSlots:
        """The attention slots of a run: `attention` in the slots of `pattern`, the base attention elsewhere."""
        return AttentionSlots(attention, Pattern.parse(pattern), dict(hparams or {}), self.params.base_attention)

    @abc.abstractmethod
    def lengths(self, pattern: Pattern) -> "tuple[int, int]":
        """(query length, key length) the tested slots see in training (recorded as the cell's lq, lk)."""

    @abc.abstractmethod
    def prepare(self) -> Any:
        """The task's data (train source, evaluation sets), deterministic given the parameters."""

    @abc.abstractmethod
    def build_model(self, pattern: Pattern, slots: AttentionSlots) -> nn.Module:
        """The model (embedding, backbone, head) for a run of `pattern`."""

    @abc.abstractmethod
    def batch(self, data: Any, generator: torch.Generator, device: torch.device) -> Any:
        """One training batch drawn with `generator`, on `device`."""

    @abc.abstractmethod
    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The scalar training loss of `model` on `batch`."""

    @abc.abstractmethod
    def evaluate(self, model: nn.Module, data: Any, device: torch.device) -> dict:
        """The task's metrics on its held-out set (model in eval mode, no gradients)."""

    @abc.abstractmethod
    def chance(self, data: Any) -> dict:
        """The metrics of a trivial predictor (uniform guess, majority class, ...), to judge learning."""


# registry ---------------------------------------------------------------------------------------------

def register_task(cls: "type[Task]") -> "type[Task]":
    """Class decorator registering a Task subclass under its `name` (the same class re-imported replaces
    itself)."""
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise TypeError(f"@register_task must decorate a subclass of cab.tasks.Task, got {cls!r}")
    if not cls.name or not cls.backbones or not cls.metrics:
        raise ValueError(f"task class {cls.__qualname__} must set name, backbones and metrics")
    if not isinstance(cls.version, int) or cls.version < 1:
        raise ValueError(f"task {cls.name!r}: version must be a positive integer, got {cls.version!r}")
    prior = _TASKS.peek(cls.name)
    if prior is not None and prior.__qualname__ == cls.__qualname__:
        _TASKS.remove(cls.name)  # its module imported again
    cls.backbones = {Pattern.parse(p): b for p, b in cls.backbones.items()}
    return _TASKS.add(cls.name, cls, f"{cls.__module__}.{cls.__qualname__}")


def tasks_dir() -> Path:
    """The folder of task modules: $CAB_TASKS_DIR, else `tasks/` beside the `cab` package (the checkout)."""
    configured = os.environ.get(TASKS_DIR_ENV)
    return Path(configured) if configured else Path(__file__).resolve().parent.parent / "tasks"


def load_tasks() -> None:
    """Import the task folder as the package `cab_tasks` and every module in it (once per process)."""
    _TASKS.load()


def _import_task_folder() -> None:
    directory = tasks_dir()
    init = directory / "__init__.py"
    if not init.is_file():
        raise FileNotFoundError(f"no task folder at {directory} (set {TASKS_DIR_ENV} to the folder holding "
                                "cab's tasks/ modules)")
    if TASKS_PACKAGE not in sys.modules:
        import_file(TASKS_PACKAGE, init, package_dirs=[str(directory)])
    for info in pkgutil.iter_modules([str(directory)]):
        if not info.name.startswith("_"):
            importlib.import_module(f"{TASKS_PACKAGE}.{info.name}")


_TASKS: "Registry[type[Task]]" = Registry("task", loader=_import_task_folder, unknown=UnknownTask)


def task_names() -> "list[str]":
    """Every registered task name, sorted."""
    return _TASKS.names()


def get_task(name: str) -> "type[Task]":
    """The task class registered under `name`; raises UnknownTask with near-match suggestions."""
    return _TASKS.get(name)


def create_task(name: str, params: "dict | None" = None) -> Task:
    """A task instance with `params` (overrides of its defaults) validated; pydantic's ValidationError
    names a wrong or unknown parameter."""
    return get_task(name)(params or {})


__all__ = [
    "Metric", "MissingData", "TASKS_DIR_ENV", "TASKS_PACKAGE", "Task", "TaskParams", "UnknownTask", "create_task",
    "get_task", "load_tasks", "register_task", "task_names", "tasks_dir",
]
