"""Cells (one unit of work, with a stable key) and their results and outcomes."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from cab.status import Status

BENCH_MODES = ("fwd", "fwd_infer", "bwd", "fwdbwd", "decode")  # decode: one incremental step (cab.bench.decode)
DTYPES = ("float32", "float64", "bfloat16", "float16")
# fields that identify a measurement; `options` (time budgets, memory pass on/off, label) do not
_IDENTITY = (
    "kind", "attention", "hparams", "pattern", "batch", "heads", "kv_heads", "lq", "lk", "head_dim",
    "dtype", "device", "mode", "seed",
)


@dataclass(frozen=True)
class Cell:
    """One unit of work: a conformance check, a benchmark, or a task training run of one attention in one
    configuration."""

    kind: str
    attention: str
    pattern: str
    hparams: dict = field(default_factory=dict)
    batch: int = 1
    heads: int = 4
    kv_heads: int = 4
    lq: int = 64
    lk: int = 64
    head_dim: int = 64
    dtype: str = "float32"
    device: str = "cpu"
    mode: str = ""
    seed: int = 0
    task: str = ""  # kind "task": the task trained and evaluated (cab.tasks)
    task_params: dict = field(default_factory=dict)  # kind "task": the task's resolved parameters
    versions: dict = field(default_factory=dict)  # {"attention": n, "task": n, ...}: the code that is measured
    label: str = ""
    options: dict = field(default_factory=dict)

    def identity(self, versioned: bool = True) -> dict:
        """The canonical fields that define the cell (its key is their hash). `task` and `task_params` join
        only when a task is set, `versions` only when set (and `versioned`)."""
        identity = {name: getattr(self, name) for name in _IDENTITY}
        if self.task:
            identity.update(task=self.task, task_params=self.task_params)
        if self.versions and versioned:
            identity.update(versions=self.versions)
        return identity

    @property
    def key(self) -> str:
        """Stable key: the same cell of the same code versions gives the same key on every machine and run."""
        return _digest(self.identity())

    @property
    def slot(self) -> str:
        """The key without the versions: what is measured, whoever's code measures it. A stored result in the
        same slot under another key is stale (it measured another version)."""
        return _digest(self.identity(versioned=False))

    @property
    def display_name(self) -> str:
        return self.label or self.attention

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Cell":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def __hash__(self) -> int:
        return hash(self.key)


def _digest(identity: dict) -> str:
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:24]


@dataclass
class Outcome:
    """What a cell runner returns: a status, metrics and a message (the failing check, the error)."""

    status: Status
    metrics: dict = field(default_factory=dict)
    message: str = ""


@dataclass
class Result:
    """One row of the results store: the cell, its outcome, provenance and timing of the run itself."""

    cell: Cell
    status: Status
    metrics: dict = field(default_factory=dict)
    message: str = ""
    provenance: dict = field(default_factory=dict)
    wall_s: float = 0.0
    started_at: str = ""
    finished_at: str = ""

    @property
    def key(self) -> str:
        return self.cell.key

    def to_dict(self) -> dict:
        return {
            "cell": self.cell.to_dict(), "status": self.status.value, "metrics": self.metrics,
            "message": self.message, "provenance": self.provenance, "wall_s": self.wall_s,
            "started_at": self.started_at, "finished_at": self.finished_at,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Result":
        return cls(
            cell=Cell.from_dict(data["cell"]), status=Status(data["status"]), metrics=data.get("metrics") or {},
            message=data.get("message", ""), provenance=data.get("provenance") or {},
            wall_s=float(data.get("wall_s", 0.0)), started_at=data.get("started_at", ""),
            finished_at=data.get("finished_at", ""),
        )


def jsonable(value: Any) -> Any:
    """Convert metrics to plain JSON types (floats for tensors and numpy scalars; NaN and +-inf become None)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Status):
        return value.value
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return number if math.isfinite(number) else None  # NaN and +-inf are not JSON
