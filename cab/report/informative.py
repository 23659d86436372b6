"""Whether a task board measures attention: exact attention must beat the negative control.

A board here is one (task, pattern), judged on the task's primary metric (the first it declares that the
board has). It is *informative* when exact attention (vanilla, else sdpa: the first the board has) beats the
negative control (an attention of family "control", normally `no_mixing`, which mixes nothing) beyond the
95% intervals, with the test the boards' ranks use (`cab.stats.separated`: the two intervals do not overlap
and exact attention's lies on the better side, in the metric's direction). Otherwise it is *not informative*:
the backbone solves the task without attention, or nothing learns it, and the board ranks noise. It is
*unknown* when the board lacks the control or exact attention, or either has fewer than two seeds (no
interval). Pure data in, dataclasses out."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import pandas as pd

from cab import registry
from cab.stats import CONFIDENCE, Summary, separated

EXACT = ("vanilla", "sdpa")  # exact attention, in order of preference
CONTROL = "no_mixing"  # the built-in negative control (any attention of family CONTROL_FAMILY counts)
CONTROL_FAMILY = "control"

INFORMATIVE, NOT_INFORMATIVE, UNKNOWN = "informative", "not informative", "unknown"


@dataclass(frozen=True)
class Informativeness:
    """The verdict on one (task, pattern) board. `exact` and `control` are the labels compared ('' when the
    board has none); `exact_summary` / `control_summary` their summaries on `metric` (None when missing)."""

    task: str
    pattern: str
    metric: str
    direction: int  # +1 higher is better, -1 lower
    state: str  # INFORMATIVE, NOT_INFORMATIVE or UNKNOWN
    exact: str
    control: str
    exact_summary: "Summary | None"
    control_summary: "Summary | None"
    message: str

    @property
    def informative(self) -> bool:
        return self.state == INFORMATIVE

    def record(self) -> dict:
        """One row of the export."""
        e, c = self.exact_summary, self.control_summary
        return {"task": self.task, "pattern": self.pattern, "metric": self.metric,
                "better": "higher" if self.direction > 0 else "lower", "state": self.state,
                "exact": self.exact or None, "exact_mean": e.mean if e else None,
                "exact_ci95_half": _half(e), "exact_seeds": e.n if e else None,
                "control": self.control or None, "control_mean": c.mean if c else None,
                "control_ci95_half": _half(c), "control_seeds": c.n if c else None, "reason": self.message}


def _half(s: "Summary | None") -> "float | None":
    return None if s is None or math.isnan(s.ci_low) else s.half_width


def is_control(attention: str) -> bool:
    """Whether a registered attention name is a negative control (family 'control'); an attention this
    process does not know counts when it is named like the built-in one."""
    try:
        return registry.get_spec(attention).family == CONTROL_FAMILY
    except registry.UnknownAttention:
        return attention == CONTROL


def control_labels(attention_of: "Mapping[str, str]") -> "set[str]":
    """The labels (of label -> attention name) that are negative controls."""
    return {name for name, attention in attention_of.items() if is_control(attention)}


def _pick(labels: "list[str]", attention_of: "Mapping[str, str]", names: "tuple[str, ...]") -> str:
    """The first label, by preference of `names`, whose attention is that name (the bare name first, then
    a labelled setting)."""
    for name in names:
        mine = [label for label in labels if attention_of.get(label, label) == name]
        if mine:
            return name if name in mine else sorted(mine, key=str.casefold)[0]
    return ""


def _text(s: Summary) -> str:
    spread = "" if math.isnan(s.ci_low) else f" ± {s.half_width:.3g}"
    return f"{s.mean:.4g}{spread} (n={s.n})"


def judge(summary: pd.DataFrame, task: str, pattern: str, metric: str, direction: int,
          attention_of: "Mapping[str, str]") -> Informativeness:
    """The verdict on board (task, pattern) from the summary table (`cab.training.summary.summary_table`:
    task, pattern, metric, attention (label), n, mean, std, ci_low, ci_high) on `metric`."""
    part = summary[(summary["task"] == task) & (summary["pattern"] == pattern) & (summary["metric"] == metric)]
    rows = {r["attention"]: r for r in part.to_dict("records")}
    labels = sorted(rows, key=str.casefold)
    exact = _pick(labels, attention_of, EXACT)
    controls = [label for label in labels if is_control(attention_of.get(label, label))]
    control = _pick(controls, attention_of, (CONTROL,)) or (controls[0] if controls else "")

    def summary_of(label: str) -> "Summary | None":
        if not label:
            return None
        r = rows[label]
        return Summary(int(r["n"]), float(r["mean"]), float(r["std"]), float(r["ci_low"]), float(r["ci_high"]))

    e, c = summary_of(exact), summary_of(control)
    common = dict(task=task, pattern=pattern, metric=metric, direction=direction, exact=exact, control=control,
                  exact_summary=e, control_summary=c)
    better = "higher" if direction > 0 else "lower"
    if e is None or c is None:
        missing = ([] if c else [CONTROL]) + ([] if e else [EXACT[0]])
        return Informativeness(**common, state=UNKNOWN,
                               message=f"informativeness unknown: add {' and '.join(missing)}")
    both = f"exact attention ({exact}) {_text(e)} vs the negative control ({control}) {_text(c)}, {metric}, " \
           f"{better} is better"
    if e.n < 2 or c.n < 2:
        return Informativeness(**common, state=UNKNOWN,
                               message=f"informativeness unknown: one seed gives no interval, run at least 2 "
                                       f"seeds ({both})")
    level = f"{round(CONFIDENCE * 100)}%"
    if separated(e, c, direction > 0):
        return Informativeness(**common, state=INFORMATIVE,
                               message=f"informative: {both}; separated beyond the {level} intervals")
    if separated(c, e, direction > 0):
        why = f"the negative control beats exact attention beyond the {level} intervals"
    else:
        why = f"exact attention does not beat the negative control beyond the {level} intervals"
    return Informativeness(**common, state=NOT_INFORMATIVE, message=f"not informative: {why} ({both})")


def primary_metric(task: str, metrics: "list[str]") -> str:
    """The metric a board is judged on: the first the task declares that the board has (the first of
    `metrics` when the task is not known here)."""
    from cab.tasks import UnknownTask, get_task
    from cab.training.summary import task_name

    try:
        declared = [m.name for m in get_task(task_name(task)).metrics]
    except UnknownTask:
        declared = []
    return next((m for m in declared if m in metrics), metrics[0])


__all__ = ["CONTROL", "CONTROL_FAMILY", "EXACT", "INFORMATIVE", "NOT_INFORMATIVE", "UNKNOWN", "Informativeness",
           "control_labels", "is_control", "judge", "primary_metric"]
