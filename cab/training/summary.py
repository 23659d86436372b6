"""Task results as statistics: per-seed metrics in long form, their summaries with confidence intervals and
tie-aware ranks, and CAB's compositional index, from the typed task table (cab.tables; a store's
`ResultStore.dataframe()` is read through the metrics schema once).

An attention is identified by its display label (the name, or name(hparams) when hyper-parameters set
it apart), so two settings of one mechanism are ranked as two entries."""

from __future__ import annotations

import json
import re

import pandas as pd

from cab.stats import CompositionalIndex, compositional_index, rank_with_ties, summarize
from cab.tables import RECORD, typed_rows
from cab.tasks import UnknownTask, get_task

LONG_FRAME_COLUMNS = ("task", "pattern", "attention", "seed", "metric", "value", "direction", "index")


def task_labels(results: pd.DataFrame) -> "dict[int, str]":
    """Row index -> the task as the boards name it: the task's name, or, where the store holds that task under
    several parameter settings (a sweep such as configs/zoology-mqar.yaml), the name with the parameters that
    differ, e.g. "recall[d_model=128, length=128]", so that two settings are two columns, never seeds of one."""
    if "task" not in results:
        return {}
    tasks = results[results["kind"] == "task"]
    params = {i: (p if isinstance(p, dict) else {}) for i, p in
              zip(tasks.index, tasks["task_params"] if "task_params" in tasks else [{}] * len(tasks))}
    differing: dict[str, list[str]] = {}
    for name in set(tasks["task"].dropna()):
        settings = [params[i] for i in tasks.index[tasks["task"] == name]]
        keys = sorted({k for p in settings for k in p})
        differing[name] = [k for k in keys if len({json.dumps(p.get(k), sort_keys=True) for p in settings}) > 1]
    labels = {}
    for i, name in zip(tasks.index, tasks["task"]):
        keys = differing.get(name) or []
        labels[i] = f"{name}[{', '.join(f'{k}={params[i].get(k)}' for k in keys)}]" if keys else str(name)
    return labels


def label_order(label: str) -> "tuple":
    """Sort key of task labels that orders their numbers as numbers: recall[d_model=64, ...] before
    recall[d_model=128, ...]."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", label))


def task_name(label: str) -> str:
    """The registered task of a board's task label (see task_labels)."""
    return label.split("[", 1)[0]


def long_metrics(results: pd.DataFrame) -> pd.DataFrame:
    """One row per (ok task result, declared scalar metric): task (its label: task_labels), pattern, attention
    (label), seed, metric, value, direction (+1 higher is better, -1 lower), index (whether it enters the
    compositional index). Results of tasks this process does not know are left out."""
    rows = []
    if "task" not in results:
        return pd.DataFrame(columns=LONG_FRAME_COLUMNS)
    results = typed_rows(results)
    labels = task_labels(results)
    done = results[(results["kind"] == "task") & (results["status"] == "ok")]
    for i, result in done.iterrows():
        try:
            task = get_task(result["task"])
        except UnknownTask:
            continue
        for metric in task.metrics:
            value = result[RECORD].scores.get(metric.name)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                rows.append((labels[i], result["pattern"], result["label"] or result["attention"],
                             int(result["seed"]), metric.name, float(value), metric.direction, metric.index))
    return pd.DataFrame(rows, columns=LONG_FRAME_COLUMNS)


def summary_table(long: pd.DataFrame) -> pd.DataFrame:
    """Per (task, pattern, metric, attention): n seeds, mean, std, 95% interval, and the rank among the
    attentions of the same (task, pattern, metric), apart only where the intervals separate."""
    rows = []
    for (task, pattern, metric), group in long.groupby(["task", "pattern", "metric"], sort=True):
        direction = int(group["direction"].iloc[0])
        summaries = {name: summarize(values) for name, values in group.groupby("attention")["value"]}
        ranks = rank_with_ties(summaries, higher_is_better=direction > 0)
        for name, s in summaries.items():
            rows.append({"task": task, "pattern": pattern, "metric": metric, "attention": name, **s.to_dict(),
                         "rank": ranks[name]})
    columns = ["task", "pattern", "metric", "attention", "n", "mean", "std", "ci_low", "ci_high", "rank"]
    return pd.DataFrame(rows, columns=columns).sort_values(["task", "pattern", "metric", "rank", "attention"],
                                                           ignore_index=True)


def task_index(long: pd.DataFrame, baseline: "str | None" = "vanilla") -> CompositionalIndex:
    """CAB's compositional index per pattern over the metrics that declare `index` (see cab.stats)."""
    return compositional_index(long[long["index"]], baseline=baseline)


__all__ = ["LONG_FRAME_COLUMNS", "label_order", "long_metrics", "summary_table", "task_index", "task_labels",
           "task_name"]
