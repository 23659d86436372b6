"""The training loop of a task cell: AdamW with linear warm-up and cosine decay, gradient clipping, a
progress bar, and a loss curve; a non-finite loss stops training with `Diverged`."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from cab.tasks import Task

CURVE_POINTS = 20


class Diverged(ArithmeticError):
    """The training loss became NaN or infinite."""

    def __init__(self, step: int, loss: float):
        self.step, self.loss = step, loss
        super().__init__(f"training diverged: loss {loss} at step {step}")


@dataclass
class TrainLog:
    """What training did: steps taken, the loss curve (mean loss over each of about CURVE_POINTS equal
    stretches of steps, as {step, loss} with the stretch's last step), the final stretch's loss, seconds."""

    steps: int
    loss_curve: list = field(default_factory=list)
    final_loss: float = math.nan
    train_s: float = 0.0


def learning_rate(step: int, steps: int, peak: float, warmup: float) -> float:
    """Linear warm-up over the first `warmup` fraction of the steps, then cosine decay to zero."""
    warm = max(1, round(warmup * steps)) if warmup > 0 else 0
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train(task: Task, model: nn.Module, data: Any, generator: torch.Generator, device: torch.device,
          progress: bool = True, description: str = "") -> TrainLog:
    """Train `model` on `task` for task.params.steps steps with batches drawn from `generator`.
    KeyboardInterrupt propagates (the progress bar is closed first); nothing is checkpointed."""
    p = task.params
    optimizer = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    stretch = max(1, math.ceil(p.steps / CURVE_POINTS))
    log, running, count = TrainLog(steps=0), 0.0, 0
    model.train()
    start = time.perf_counter()
    # disable=None: no bar when stderr is not a terminal (logs, worker processes)
    with tqdm(total=p.steps, desc=description, unit="step", leave=False, disable=None if progress else True,
              file=sys.stderr, dynamic_ncols=True) as bar:
        for step in range(p.steps):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, p.steps, p.lr, p.warmup)
            loss = task.loss(model, task.batch(data, generator, device))
            value = float(loss.detach())
            if not math.isfinite(value):
                raise Diverged(step, value)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), p.grad_clip)
            optimizer.step()
            running, count = running + value, count + 1
            log.steps = step + 1
            if count == stretch or step + 1 == p.steps:
                log.final_loss = running / count
                log.loss_curve.append({"step": step + 1, "loss": log.final_loss})
                bar.set_postfix_str(f"loss {log.final_loss:.4f}")
                running, count = 0.0, 0
            bar.update(1)
    log.train_s = time.perf_counter() - start
    return log
