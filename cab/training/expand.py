"""The `tasks` section of grid configs (`TasksSection`) and its expansion into task cells: task x pattern x
attention x seed. Importing this module registers the section (cab.config imports it on first use).

Each task runs the patterns it exercises (narrowed by the section's and the entry's `patterns`), with
every selected attention that declares the pattern, for `seeds` seeds (config.seed, config.seed + 1, ...).
A task may be listed several times with different parameters (a sweep: e.g. one entry per model width
`d_model` and sequence length); an entry's `attentions` narrows the section's attentions to those names for
that entry (e.g. an expensive attention only at the smallest width). `attention_hparams` gives
hyper-parameters by attention name (useful with `attentions: all`, e.g. a window scaled to short sequences);
an entry's own hparams win. A cell's `task_params` are the task's full resolved parameters, so a changed
default is a new cell."""

from __future__ import annotations

import itertools
from typing import Annotated, Any, Iterator, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag, ValidationError

from cab.cells import Cell
from cab.config import AttentionEntry, Name, PatternList, PositiveInt, Section
from cab.grid import register_section
from cab.patterns import Pattern
from cab.registry import UnknownHyperparameter, check_hparams, get_spec, versions_of
from cab.tasks import TaskParams, UnknownTask, get_task, task_names


class TaskEntry(BaseModel):
    """One task of a `tasks` section: a registered task, overrides of its parameters, optionally fewer
    patterns than the task exercises or fewer of the section's attentions (by name), and a display label."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: Name
    params: dict[str, Any] = Field(default_factory=dict)
    patterns: "PatternList | None" = None
    attentions: "list[Name] | None" = Field(None, min_length=1)
    label: str = ""


def _task_selection_kind(value: Any) -> str:
    return "all" if isinstance(value, str) else "list"


def _normalise_tasks(value: Any) -> Any:
    """`all`, or a list whose plain-string items are task names."""
    if value == "all":
        return value
    if not isinstance(value, list) or not value:
        raise ValueError(f"expected 'all' or a non-empty list of tasks, got {value!r}")
    return [{"name": item} if isinstance(item, str) else item for item in value]


TaskSelection = Annotated[
    Union[Annotated[Literal["all"], Tag("all")], Annotated[list[TaskEntry], Tag("list")]],
    Discriminator(_task_selection_kind),
    BeforeValidator(_normalise_tasks),
]


class TasksSection(Section):
    """Training cells: task x pattern x attention x seed (laid out by cab.training.expand.expand_tasks).
    `params` apply to every task (only the parameters all tasks share), each entry's own `params` after
    them; `attention_hparams` maps attention names to hyper-parameters (an entry's own hparams win);
    `seeds` seeds run from the config's seed on; `gate` runs conformance on every attention a model uses
    before training; `progress` shows a training progress bar on a terminal."""

    tasks: TaskSelection = "all"
    seeds: PositiveInt = 1
    params: dict[str, Any] = Field(default_factory=dict)
    attention_hparams: dict[str, dict[str, Any]] = Field(default_factory=dict)
    gate: bool = True
    progress: bool = True


def _params_error(config: Any, where: tuple, exc: ValidationError, prefix: str) -> Exception:
    """A located ConfigError from the first pydantic error of a task's parameters."""
    error = exc.errors()[0]
    loc = tuple(error["loc"])
    if error["type"] == "extra_forbidden":
        message = f"{prefix} has no parameter {loc[-1]!r}"
    else:
        message = f"{prefix}: {error['msg']}"
    return config.error(message, where + tuple(p for p in loc[:1] if isinstance(p, str)))


def _resolved(config: Any, section: Any, index: int, entry: Any) -> "tuple[Any, dict]":
    """(task instance, its parameters as JSON) for one entry: section-wide params, then the entry's."""
    common = set(TaskParams.model_fields)
    for key in section.params:
        if key not in common:
            raise config.error(f"section-wide params may set only the parameters every task has "
                               f"({', '.join(sorted(common))}); set {key!r} on the tasks that take it",
                               ("tasks", "params", key))
    where = ("tasks", "tasks", index)
    try:
        task_class = get_task(entry.name)
    except UnknownTask as exc:
        raise config.error(str(exc), where + ("name",)) from None
    try:
        params = task_class.Params.model_validate({**section.params, **entry.params})
    except ValidationError as exc:
        raise _params_error(config, where + ("params",), exc, f"task {entry.name!r}") from None
    try:
        get_spec(params.base_attention)
    except LookupError as exc:
        raise config.error(str(exc), where + ("params", "base_attention")) from None
    return task_class(params), params.model_dump(mode="json")


def _attention_entries(config: Any, section: Any) -> list:
    """The section's attentions, each with the section's `attention_hparams` for its name under its own."""
    for name, hparams in section.attention_hparams.items():
        where = ("tasks", "attention_hparams", name)
        try:
            spec = get_spec(name)
        except LookupError as exc:
            raise config.error(str(exc), where) from None
        try:
            check_hparams(spec, hparams)
        except UnknownHyperparameter as exc:
            raise config.error(str(exc), where) from None
    return [AttentionEntry(name=e.name, hparams={**section.attention_hparams.get(e.name, {}), **e.hparams},
                           label=e.label) for e in config.attention_entries(section)]


def _narrowed(config: Any, index: int, entry: TaskEntry, entries: list) -> list:
    """The section's attention entries that a task entry's `attentions` names (all of them without one)."""
    if entry.attentions is None:
        return entries
    names = {e.name for e in entries}
    for i, name in enumerate(entry.attentions):
        if name not in names:
            raise config.error(f"attention {name!r} is not one of the section's attentions "
                               f"({', '.join(sorted(names))}); an entry can only narrow them",
                               ("tasks", "tasks", index, "attentions", i))
    wanted = set(entry.attentions)
    return [e for e in entries if e.name in wanted]


def expand_tasks(config: Any, section: TasksSection) -> "tuple[int, Iterator[Cell]]":
    """(number of cells, the cells) of a `tasks` section, in task, pattern, attention, seed order."""
    entries = _attention_entries(config, section)
    allowed = set(config.patterns_of(section))
    seeds = [config.seed + i for i in range(section.seeds)]
    tasks = section.tasks if section.tasks != "all" else [TaskEntry(name=name) for name in task_names()]
    cells: list[Cell] = []
    for index, entry in enumerate(tasks):
        task, params = _resolved(config, section, index, entry)
        wanted = set(entry.patterns) if entry.patterns else set(Pattern)
        patterns = [p for p in task.patterns() if p in allowed and p in wanted]
        options = {"threads": config.resolved_threads, "gate": section.gate, "progress": section.progress,
                   "task_label": entry.label or entry.name}
        for pattern, attention, seed in itertools.product(patterns, _narrowed(config, index, entry, entries), seeds):
            if pattern not in get_spec(attention.name).patterns:
                continue
            lq, lk = task.lengths(pattern)
            cells.append(Cell(
                kind="task", attention=attention.name, pattern=pattern.value, hparams=dict(attention.hparams),
                task=task.name, task_params=params, batch=task.params.batch_size, heads=task.params.heads,
                kv_heads=task.params.heads, lq=lq, lk=lk, head_dim=task.params.head_dim, dtype="float32",
                device=config.device, mode="train", seed=seed, label=attention.display_label,
                versions=versions_of(attention.name, attention.hparams, task=task.version,
                                     base=get_spec(task.params.base_attention).version),
                options=dict(options),
            ))
    return len(cells), iter(cells)


register_section("tasks", TasksSection, expand_tasks)

__all__ = ["TaskEntry", "TasksSection", "expand_tasks"]
