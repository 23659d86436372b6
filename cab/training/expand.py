"""Expansion of a config's `tasks` section into task cells: task x pattern x attention x seed.

Each task runs the patterns it exercises (narrowed by the section's and the entry's `patterns`), with
every selected attention that declares the pattern, for `seeds` seeds (config.seed, config.seed + 1, ...).
`attention_hparams` gives hyper-parameters by attention name (useful with `attentions: all`, e.g. a
window scaled to short sequences); an entry's own hparams win. A cell's `task_params` are the task's full
resolved parameters, so a changed default is a new cell."""

from __future__ import annotations

import itertools
from typing import Any, Iterator

from pydantic import ValidationError

from cab.cells import Cell
from cab.patterns import Pattern
from cab.registry import get_spec


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
    from cab.tasks import TaskParams, UnknownTask, get_task

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
    from cab.config import AttentionEntry
    from cab.registry import UnknownHyperparameter, check_hparams

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


def expand_tasks(config: Any, section: Any) -> "tuple[int, Iterator[Cell]]":
    """(number of cells, the cells) of a `tasks` section, in task, pattern, attention, seed order."""
    from cab.tasks import TaskEntry, task_names

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
        for pattern, attention, seed in itertools.product(patterns, entries, seeds):
            if pattern not in get_spec(attention.name).patterns:
                continue
            lq, lk = task.lengths(pattern)
            cells.append(Cell(
                kind="task", attention=attention.name, pattern=pattern.value, hparams=dict(attention.hparams),
                task=task.name, task_params=params, batch=task.params.batch_size, heads=task.params.heads,
                kv_heads=task.params.heads, lq=lq, lk=lk, head_dim=task.params.head_dim, dtype="float32",
                device=config.device, mode="train", seed=seed, label=attention.display_label,
                options=dict(options),
            ))
    return len(cells), iter(cells)


__all__ = ["expand_tasks"]
