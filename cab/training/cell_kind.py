"""Runs one task cell: build the task's model with the attention under test in the slots of one pattern,
gate every attention it uses through conformance, train with the cell's seed, evaluate, and return the
metrics (task metrics, the chance level, parameter counts, the loss curve, steps and times).

A cell interrupted mid-training is not stored, so `cab run` reruns it from scratch (no checkpoints)."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from cab.attention.base import Attention, UnsupportedPattern
from cab.cells import Cell, Outcome
from cab.devices import device_unavailable
from cab.kinds import register_cell_kind
from cab.metrics import TaskMetrics
from cab.models import count_parameters
from cab.patterns import Pattern
from cab.registry import get_spec
from cab.status import Status
from cab.tasks import MissingData, Task, create_task
from cab.training.loop import Diverged, train

TRAIN_DTYPE = "float32"


def slot_attentions(model: nn.Module) -> "list[tuple[str, Pattern, bool]]":
    """The distinct (attention name, pattern, under test) of the attention slots of a model, in order."""
    found: dict = {}
    for module in model.modules():
        if isinstance(module, Attention):
            found.setdefault((type(module).name, module.pattern, bool(getattr(module, "cab_tested", False))), None)
    return list(found)


def _unavailable(names: "list[str]", device: str) -> "str | None":
    reason = device_unavailable(device)
    for name in names:
        reason = reason or get_spec(name).unavailable_reason(device)
    return reason


def _gate(model: nn.Module, hparams: dict, device: str, shapes: "dict | None" = None) -> "Outcome | None":
    """The failed gate of any attention the model uses (the tested one with the cell's hyper-parameters,
    the base one with its defaults), or None when all pass. With `shapes` (from `attention_calls`), each
    attention is also probed at every shape the model calls it with."""
    from cab.check import gate

    for name, pattern, tested in slot_attentions(model):
        for shape in (shapes or {}).get((name, pattern, tested), [None]):
            report = gate(name, pattern, hparams if tested else {}, device, TRAIN_DTYPE, shape)
            if report.status is not Status.OK:
                role = "attention under test" if tested else "base attention"
                metrics = TaskMetrics(gate=report.status.value, gate_attention=name, gate_coverage=report.coverage)
                return Outcome(report.status, metrics=metrics.to_dict(),
                               message=f"correctness gate failed for the {role} {name} ({pattern.value}): "
                                       f"{report.message}")
    return None


def attention_calls(task: Task, model: nn.Module, data: Any, device: torch.device, seed: int) -> dict:
    """{(attention, pattern, under test): [Shape, ...]}: the input shapes the model's attention slots are
    called with on one training batch (what the task publishes), recorded by forward hooks."""
    from cab.check import published_shape

    calls: dict = {}

    def record(module: Attention, args: tuple) -> None:
        q, k = args[0], args[1]
        shape = published_shape(q.shape[0], q.shape[1], k.shape[1], q.shape[-2], k.shape[-2], q.shape[-1])
        key = (type(module).name, module.pattern, bool(getattr(module, "cab_tested", False)))
        if shape not in calls.setdefault(key, []):
            calls[key].append(shape)

    handles = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, Attention)]
    try:
        with torch.no_grad():
            task.loss(model, task.batch(data, torch.Generator().manual_seed(seed), device))
    finally:
        for handle in handles:
            handle.remove()
    return calls


def run_task(task: "Task | str", attention: str, pattern: "Pattern | str", *, hparams: "dict | None" = None,
             params: "dict | None" = None, seed: int = 0, device: str = "cpu", dtype: str = TRAIN_DTYPE,
             gate: bool = True, progress: bool = False, description: str = "") -> Outcome:
    """Train and evaluate `attention` in the slots of `pattern` of `task` (a registered name, with
    `params` overriding its defaults, or a Task instance). Unsupported combinations and failed gates are
    Outcomes; other failures raise (the runner records them as errors)."""
    task = task if isinstance(task, Task) else create_task(task, params)
    pattern, hparams = Pattern.parse(pattern), dict(hparams or {})
    if pattern not in task.patterns():
        names = ", ".join(p.value for p in task.patterns())
        return Outcome(Status.UNSUPPORTED, message=f"task {task.name!r} exercises {names}, not {pattern.value}")
    if dtype != TRAIN_DTYPE:
        return Outcome(Status.UNSUPPORTED, message=f"task cells train in {TRAIN_DTYPE}, not {dtype}")
    reason = _unavailable([attention, task.params.base_attention], device)
    if reason:
        return Outcome(Status.UNSUPPORTED, message=reason)
    torch_device = torch.device(device)
    torch.manual_seed(seed)
    try:
        model = task.build_model(pattern, task.slots(attention, pattern, hparams)).to(torch_device)
    except UnsupportedPattern as exc:
        return Outcome(Status.UNSUPPORTED, message=str(exc))
    if gate:
        failed = _gate(model, hparams, device)
        if failed is not None:
            return failed
    try:
        data = task.prepare()
    except MissingData as exc:
        return Outcome(Status.ERROR, message=f"{type(exc).__name__}: {exc}")
    probed: dict = {}
    if gate:  # the suite passed: now probe every attention at the shapes the task calls it with
        probed = attention_calls(task, model, data, torch_device, seed)
        failed = _gate(model, hparams, device, probed)
        if failed is not None:
            return failed
    torch.manual_seed(seed)  # the gate above may have drawn from the global generator
    generator = torch.Generator().manual_seed(seed)
    counts = count_parameters(model)
    try:
        log = train(task, model, data, generator, torch_device, progress=progress,
                    description=description or f"{task.name} {attention} {pattern.value} seed {seed}")
    except Diverged as exc:
        return Outcome(Status.ERROR, metrics=TaskMetrics(diverged_at_step=exc.step, **counts.metrics()).to_dict(),
                       message=str(exc))
    model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        scores = task.evaluate(model, data, torch_device)
    eval_s = time.perf_counter() - start
    return Outcome(Status.OK, metrics=TaskMetrics(
        scores=scores, chance=task.chance(data), **counts.metrics(), steps=log.steps,
        gate="ok" if gate else "off",
        gate_shapes={f"{name} {pattern.value}": [s.describe() for s in shapes]
                     for (name, pattern, _), shapes in probed.items()},
        final_loss=log.final_loss, loss_curve=log.loss_curve, train_s=log.train_s, eval_s=eval_s,
    ).to_dict())


def _describe(cell: Cell) -> str:
    return f"{cell.task} {cell.display_name} {cell.pattern} seed={cell.seed}"


@register_cell_kind("task", describe=_describe)
def task_cell(cell: Cell) -> Outcome:
    """The runner's entry point for cells of kind "task" (fields `task` and `task_params`)."""
    if cell.kind != "task":
        raise ValueError(f"task_cell runs cells of kind 'task', got {cell.kind!r}")
    options: Any = cell.options
    return run_task(cell.task, cell.attention, cell.pattern, hparams=cell.hparams, params=cell.task_params,
                    seed=cell.seed, device=cell.device, dtype=cell.dtype, gate=options.get("gate", True) is not False,
                    progress=bool(options.get("progress", False)),
                    description=f"{cell.task} {cell.display_name} {cell.pattern} seed {cell.seed}")
