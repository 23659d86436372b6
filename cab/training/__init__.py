"""Task cells: train a small model with an attention plugged into the slots of one pattern, evaluate it,
lay a config's `tasks` section out as cells (`expand`), and summarise the stored results (`summary`)."""

from cab.training.cell import run_task, slot_attentions, task_cell
from cab.training.loop import Diverged, TrainLog, learning_rate, train

__all__ = ["Diverged", "TrainLog", "learning_rate", "run_task", "slot_attentions", "task_cell", "train"]
