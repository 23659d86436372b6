"""`cab gpu-check`: one offline check of a GPU machine within a hard time budget (issue 19).

For one GPU with a preinstalled CUDA build of torch and no network (`scripts/gpu-check.sh` wraps it, and may
install wheels from a folder with `pip --no-index` first). A plan (`configs/gpu-check.yaml`; the tiny CPU
rehearsal: `configs/gpu-check-cpu.yaml`) lays out five phases:

1. **environment**: GPU, driver, torch, triton, CUDA, and which optional kernels (flash-attn, fla) and
   packages are present; stored as the run's provenance in the store and shown in summary.md.
2. **gate**: a "check" cell (the gate's suite, seed 0) for every registered attention x declared pattern x
   dtype (bf16 and fp32), on the device.
3. **kernels**: cab's Triton kernels (the `triton` backend of linear_elu, sliding_window, lightning) against
   the same attention's `torch` backend on the device, forward and backward, both held to the torch path
   in float64 (`compare_backends`).
4. **panel**: "bench" cells (whose gate also probes the published shape) of the panel's rows, forward and
   forward+backward, L = 1K-32K, with the memory pass; length-major, so a short budget drops the longest.
5. **report**: the leaderboard (`cab.report.render_report`) and summary.md; at most 8 files of at most
   16 MiB each in OUTDIR (the leaderboard's per-attention pages and tables go into one zip, or are left
   out when too large), checked at the end and stated in summary.md.

Budget: every phase ends at min(its own `budget_s` from its start, the run's end less `reserve_s`); a cell
runs under a soft time limit of what is left (at most the phase's `cell_timeout_s`), and a cell whose
estimate exceeds what is left is stored as `skipped` with the reason. A watchdog thread writes summary.md
from what finished and exits the process at the run's end whatever still runs (a native call that a
signal cannot interrupt). The plan's estimates (`estimate_plan`) let a test hold the GPU plan to its budget
without a GPU.

Nothing here imports pydantic, datasets or ray: the plan is read with PyYAML into dataclasses and cells are
built directly, so the check runs on an image that lacks them.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

import torch
import yaml

from cab import provenance, registry
from cab.cells import Cell, Outcome, Result, jsonable
from cab.check.compare import relative_error
from cab.devices import device_unavailable
from cab.failures import CellTimeout, outcome_of_exception, time_limit
from cab.metrics import KERNEL_TENSORS, KernelMetrics
from cab.registry import versions_of
from cab.status import Status
from cab.store import ResultStore

MAX_FILES = 8
MAX_FILE_BYTES = 16 * 1024 * 1024
STORE_NAME = "cab.sqlite"
SUMMARY_NAME = "summary.md"
OPTIONAL_PACKAGES = {  # what the summary reports as present or absent: import name -> distribution
    "flash_attn": "flash-attn", "fla": "flash-linear-attention", "triton": "triton", "pydantic": "pydantic",
    "datasets": "datasets", "ray": "ray", "pynvml": "nvidia-ml-py",
}
# kernels phase: the triton backend's error vs the float64 torch path may be this (relative to the largest
# magnitude) or `KERNEL_SLACK` times the torch backend's own error in the same dtype, whichever is larger
KERNEL_FLOOR = {"float32": 5e-3, "float16": 1e-2, "bfloat16": 4e-2}
KERNEL_SLACK = 4.0
PHASES = ("environment", "gate", "kernels", "panel", "report")


class PlanError(ValueError):
    """A plan file that cannot be used (unknown key, wrong type), with the key path."""


CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def default_plan(device: "str | None") -> Path:
    """configs/gpu-check-cpu.yaml for a CPU device, configs/gpu-check.yaml otherwise."""
    return CONFIGS / ("gpu-check-cpu.yaml" if device and torch.device(device).type == "cpu" else "gpu-check.yaml")


# ---- the plan ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    """One attention row of the kernels or panel phase: name, hyper-parameters, label, and the module it
    needs (`requires`: left out, with the reason, when that module is not importable)."""

    name: str
    hparams: dict = field(default_factory=dict)
    label: str = ""
    requires: str = ""
    patterns: tuple = ()

    @property
    def display(self) -> str:
        return self.label or self.name


@dataclass(frozen=True)
class GatePhase:
    """Every listed attention (or `all`) x declared pattern (or those listed) x dtype."""

    budget_s: float
    est_cell_s: float
    attentions: "tuple[str, ...] | str" = "all"
    patterns: "tuple[str, ...] | str" = "declared"
    dtypes: tuple = ("bfloat16", "float32")
    cell_timeout_s: float = 60.0


@dataclass(frozen=True)
class KernelPhase:
    """Rows (each with its patterns) x dtypes at one shape: triton backend vs torch backend."""

    budget_s: float
    est_cell_s: float
    rows: "tuple[Row, ...]"
    dtypes: tuple = ("float32", "bfloat16")
    batch: int = 2
    heads: int = 4
    kv_heads: int = 2
    length: int = 1024
    kv_ratio: float = 0.75
    head_dim: int = 64
    cell_timeout_s: float = 60.0


@dataclass(frozen=True)
class PanelPhase:
    """Bench cells: length x mode x row, at one shape and dtype; `est_cell_s` per length."""

    budget_s: float
    est_cell_s: "dict[int, float]"
    rows: "tuple[Row, ...]"
    lengths: tuple = (1024, 2048, 4096, 8192, 16384, 32768)
    modes: tuple = ("fwd", "fwdbwd")
    pattern: str = "CS"
    dtype: str = "bfloat16"
    batch: int = 1
    heads: int = 8
    head_dim: int = 64
    min_run_time_s: float = 0.05
    min_samples: int = 5
    warmup_s: float = 0.05
    memory: bool = True
    max_memory_bytes: "int | None" = None
    cell_timeout_s: float = 60.0


@dataclass(frozen=True)
class Plan:
    """A whole check: device, total budget, the time kept for the report, and the phases."""

    name: str
    device: str
    budget_s: float
    reserve_s: float
    environment_est_s: float
    gate: GatePhase
    kernels: KernelPhase
    panel: PanelPhase
    seed: int = 0
    threads: "int | None" = None
    fidelity_budget_s: float = 0.0
    source: str = ""


def _take(data: dict, where: str, cls: type, nested: "dict[str, Callable[[object, str], object]] | None" = None
          ) -> dict:
    """`data`'s keys checked against `cls`'s fields (a PlanError names an unknown one), tuples for lists,
    and the `nested` keys converted by their functions."""
    if not isinstance(data, dict):
        raise PlanError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise PlanError(f"{where}.{unknown[0]}: unknown key (known: {', '.join(sorted(known))})")
    out = {}
    for key, value in data.items():
        if nested and key in nested:
            out[key] = nested[key](value, f"{where}.{key}")
        else:
            out[key] = tuple(value) if isinstance(value, list) else value
    return out


def _rows(value: object, where: str) -> "tuple[Row, ...]":
    if not isinstance(value, list):
        raise PlanError(f"{where}: expected a list of attention rows")
    rows = []
    for i, item in enumerate(value):
        rows.append(Row(name=item) if isinstance(item, str) else Row(**_take(item, f"{where}[{i}]", Row)))
    return tuple(rows)


def parse_plan(data: dict, source: str = "") -> Plan:
    """A Plan from a parsed YAML document; PlanError names the first unknown or missing key."""
    if not isinstance(data, dict):
        raise PlanError(f"{source or 'plan'}: expected a mapping at the top level")
    top = dict(data)
    try:
        sections = {
            "gate": GatePhase(**_take(top.pop("gate", {}), "gate", GatePhase)),
            "kernels": KernelPhase(**_take(top.pop("kernels", {}), "kernels", KernelPhase, {"rows": _rows})),
            "panel": PanelPhase(**_take(top.pop("panel", {}), "panel", PanelPhase, {
                "rows": _rows, "est_cell_s": lambda v, w: {int(k): float(s) for k, s in dict(v).items()}})),
        }
        return Plan(**_take(top, "plan", Plan), **sections, source=source)
    except TypeError as exc:  # a missing required key
        raise PlanError(f"{source or 'plan'}: {exc}") from None


def load_plan(path: "str | Path") -> Plan:
    """The plan in a YAML file (safe loader)."""
    path = Path(path)
    return parse_plan(yaml.safe_load(path.read_text()), source=str(path))


# ---- cells of each phase ------------------------------------------------------------------------------------

def missing_module(row: Row) -> "str | None":
    """Why a row is left out (its `requires` module is not importable), or None."""
    if row.requires and importlib.util.find_spec(row.requires) is None:
        return f"{row.display}: module {row.requires!r} is not installed"
    return None


def gate_cells(plan: Plan) -> "list[Cell]":
    """One check cell (the gate's suite, seed 0) per attention x declared pattern x dtype."""
    phase = plan.gate
    names = registry.names() if phase.attentions == "all" else list(phase.attentions)
    cells = []
    for name in names:
        spec = registry.get_spec(name)
        patterns = [p.value for p in spec.patterns]
        if phase.patterns != "declared":
            patterns = [p for p in patterns if p in phase.patterns]
        for pattern in patterns:
            for dtype in phase.dtypes:
                cells.append(Cell(kind="check", attention=name, pattern=pattern, dtype=dtype, device=plan.device,
                                  seed=0, versions=versions_of(name, {}), options={"threads": plan.threads}))
    return cells


def kernel_cells(plan: Plan) -> "list[Cell]":
    """One kernel cell per row x pattern x dtype: the row's attention with backend='triton' (compared with
    backend='torch' by `compare_backends`). GQA only where the attention declares it."""
    phase, cells = plan.kernels, []
    for row in phase.rows:
        spec = registry.get_spec(row.name)
        kv_heads = phase.kv_heads if spec.supports_gqa else phase.heads
        hparams = {**row.hparams, "backend": "triton"}
        for pattern in row.patterns or tuple(p.value for p in spec.patterns):
            cross = pattern in ("NC", "CC")
            lk = max(1, round(phase.length * phase.kv_ratio)) if cross else phase.length
            for dtype in phase.dtypes:
                cells.append(Cell(kind="kernel", attention=row.name, pattern=pattern, hparams=hparams,
                                  batch=phase.batch, heads=phase.heads, kv_heads=kv_heads, lq=phase.length, lk=lk,
                                  head_dim=phase.head_dim, dtype=dtype, device=plan.device, seed=plan.seed,
                                  label=f"{row.display}[triton vs torch]", versions=versions_of(row.name, hparams),
                                  options={"threads": plan.threads}))
    return cells


def panel_rows(plan: Plan) -> "tuple[list[Row], list[str]]":
    """(the panel's rows that can run here, why the others are left out)."""
    rows, absent = [], []
    for row in plan.panel.rows:
        reason = missing_module(row)
        (absent if reason else rows).append(reason or row)
    return rows, absent


def panel_cells(plan: Plan, rows: "Iterable[Row] | None" = None) -> "list[Cell]":
    """Bench cells length-major (length, then mode, then row), so the budget drops the longest first."""
    phase = plan.panel
    rows = list(plan.panel.rows if rows is None else rows)
    options = {"threads": plan.threads, "min_run_time_s": phase.min_run_time_s, "min_samples": phase.min_samples,
               "warmup_s": phase.warmup_s, "memory": phase.memory}
    if phase.max_memory_bytes:
        options["max_memory_bytes"] = phase.max_memory_bytes
    return [Cell(kind="bench", attention=row.name, pattern=phase.pattern, hparams=dict(row.hparams),
                 batch=phase.batch, heads=phase.heads, kv_heads=phase.heads, lq=length, lk=length,
                 head_dim=phase.head_dim, dtype=phase.dtype, device=plan.device, mode=mode, seed=plan.seed,
                 label=row.label, versions=versions_of(row.name, row.hparams), options=dict(options))
            for length in phase.lengths for mode in phase.modes for row in rows]


def cell_estimate(plan: Plan, cell: Cell) -> float:
    """The plan's estimated seconds for one cell."""
    if cell.kind == "check":
        return plan.gate.est_cell_s
    if cell.kind == "kernel":
        return plan.kernels.est_cell_s
    table = plan.panel.est_cell_s
    if cell.lq in table:
        return table[cell.lq]
    return table[min(table, key=lambda length: abs(length - cell.lq))]


@dataclass(frozen=True)
class PlanEstimate:
    """Cells and estimated seconds per phase (every panel row counted, present or not)."""

    cells: "dict[str, int]"
    seconds: "dict[str, float]"  # environment, gate, kernels, panel (each capped by its budget), report
    uncapped_s: "dict[str, float]"  # gate, kernels, panel: every cell's estimate, whatever the phase budget
    budget_s: float

    @property
    def total_cells(self) -> int:
        return sum(self.cells.values())

    @property
    def total_s(self) -> float:
        return sum(self.seconds.values())


def estimate_plan(plan: Plan) -> PlanEstimate:
    """The plan's size and estimated time: each phase's cells times their estimates, capped by the phase's
    budget (what runs past it is skipped), plus the environment and the report's reserve."""
    phases = {"gate": gate_cells(plan), "kernels": kernel_cells(plan), "panel": panel_cells(plan)}
    caps = {"gate": plan.gate.budget_s, "kernels": plan.kernels.budget_s, "panel": plan.panel.budget_s}
    seconds = {"environment": plan.environment_est_s}
    seconds.update({name: min(caps[name], sum(cell_estimate(plan, c) for c in cells))
                    for name, cells in phases.items()})
    seconds["report"] = plan.reserve_s
    uncapped = {name: sum(cell_estimate(plan, c) for c in cells) for name, cells in phases.items()}
    return PlanEstimate(cells={name: len(cells) for name, cells in phases.items()}, seconds=seconds,
                        uncapped_s=uncapped, budget_s=plan.budget_s)


# ---- environment ---------------------------------------------------------------------------------------------

def _distribution_version(module: str) -> "str | None":
    names = (OPTIONAL_PACKAGES.get(module, module), module)
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "present" if importlib.util.find_spec(module) is not None else None


def gpu_driver() -> "str | None":
    """The NVIDIA driver version from nvidia-smi (None without one)."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def environment(device: str) -> dict:
    """The machine as the check saw it: provenance plus GPU, driver, capability, memory, and the optional
    packages (version, or None when absent)."""
    env = provenance.collect(device)
    cuda = torch.device(device).type == "cuda" and torch.cuda.is_available()
    env.update(
        cuda_available=torch.cuda.is_available(), cudnn=torch.backends.cudnn.version() if cuda else None,
        gpu=torch.cuda.get_device_name(torch.device(device)) if cuda else None, driver=gpu_driver(),
        gpu_count=torch.cuda.device_count() if torch.cuda.is_available() else 0,
        triton_interpret=os.environ.get("TRITON_INTERPRET"),
        packages={module: _distribution_version(module) for module in OPTIONAL_PACKAGES},
    )
    if cuda:
        props = torch.cuda.get_device_properties(torch.device(device))
        env.update(capability=f"{props.major}.{props.minor}", gpu_memory_bytes=props.total_memory)
    return env


# ---- kernels: triton backend vs torch backend -------------------------------------------------------------

def _backend_run(cell: Cell, backend: str, dtype: torch.dtype, inputs: "list[torch.Tensor]",
                 mask: torch.Tensor, cotangent: torch.Tensor) -> "tuple[list[torch.Tensor], str]":
    """([output, dq, dk, dv], the backend that ran) of the cell's attention on `backend` in `dtype`."""
    hparams = {**cell.hparams, "backend": backend}
    torch.manual_seed(cell.seed)
    attn = registry.create_attention(cell.attention, cell.pattern, cell.heads, cell.head_dim, **hparams)
    attn = attn.to(device=torch.device(cell.device), dtype=dtype)
    xs = [t.to(dtype).requires_grad_() for t in inputs]
    out = attn(*xs, key_padding_mask=mask)
    grads = torch.autograd.grad((out.double() * cotangent).sum(), xs)
    return [out.detach(), *(g.detach() for g in grads)], str(getattr(attn, "backend", backend))


def compare_backends(cell: Cell) -> Outcome:
    """The cell's attention on backend='triton' and on backend='torch' in the cell's dtype, each against the
    torch backend in float64: output and the gradients of q, k, v (padding in one batch row). ok when the
    triton error is at most max(KERNEL_FLOOR[dtype], KERNEL_SLACK x the torch error), else incorrect."""
    from cab.attention.kernels import triton_unavailable_reason
    from cab.bench.inputs import torch_dtype

    reason = device_unavailable(cell.device) or triton_unavailable_reason(cell.device)
    if reason:
        return Outcome(Status.UNSUPPORTED, message=reason)
    device, dtype = torch.device(cell.device), torch_dtype(cell.dtype)
    gen = torch.Generator().manual_seed(cell.seed)
    shapes = [(cell.batch, cell.heads, cell.lq, cell.head_dim), (cell.batch, cell.kv_heads, cell.lk, cell.head_dim),
              (cell.batch, cell.kv_heads, cell.lk, cell.head_dim)]
    inputs = [torch.randn(*s, generator=gen, dtype=torch.float64).to(device) for s in shapes]
    cotangent = torch.randn(cell.batch, cell.heads, cell.lq, cell.head_dim, generator=gen,
                            dtype=torch.float64).to(device)
    mask = torch.zeros(cell.batch, cell.lk, dtype=torch.bool)
    mask[-1, -max(1, cell.lk // 8):] = True  # the last batch row's last keys are padding
    mask = mask.to(device)
    triton_run, ran = _backend_run(cell, "triton", dtype, inputs, mask, cotangent)
    torch_run, _ = _backend_run(cell, "torch", dtype, inputs, mask, cotangent)
    reference, _ = _backend_run(cell, "torch", torch.float64, inputs, mask, cotangent)
    errors: dict = {}
    problems = []
    for name, got, base, want in zip(KERNEL_TENSORS, triton_run, torch_run, reference):
        err, base_err = relative_error(got, want), relative_error(base, want)
        bound = max(KERNEL_FLOOR[cell.dtype], KERNEL_SLACK * base_err)
        errors.update({f"{name}_err_triton": err, f"{name}_err_torch": base_err,
                       f"{name}_triton_vs_torch": relative_error(got, base)})
        if not err <= bound:
            problems.append(f"{name}: triton error {err:.3g} > {bound:.3g} (torch backend: {base_err:.3g})")
    if ran != "triton":
        problems.append(f"backend that ran is {ran!r}, not 'triton'")
    metrics = KernelMetrics(backend=ran, floor=KERNEL_FLOOR[cell.dtype], slack=KERNEL_SLACK, **errors).to_dict()
    if problems:
        return Outcome(Status.INCORRECT, metrics=metrics, message="; ".join(problems))
    worst = max(errors[f"{n}_err_triton"] for n in KERNEL_TENSORS)
    return Outcome(Status.OK, metrics=metrics, message=f"triton matches torch (worst relative error {worst:.3g})")


# ---- running phases under the budget ------------------------------------------------------------------

def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _result(cell: Cell, outcome: Outcome, started: str, t0: float) -> Result:
    return Result(cell=cell, status=outcome.status, metrics=jsonable(outcome.metrics), message=outcome.message,
                  provenance=provenance.collect(cell.device), wall_s=round(time.perf_counter() - t0, 4),
                  started_at=started, finished_at=_now())


def run_one(cell: Cell, timeout_s: float) -> Result:
    """One cell in this process under a time limit repeated every second (`time_limit(..., repeat_s=1)`):
    check and bench cells through
    cab.runner.run_cell, kernel cells through compare_backends (the same failure handling)."""
    from cab.runner import run_cell

    started, t0 = _now(), time.perf_counter()
    try:
        with time_limit(max(timeout_s, 0.01), repeat_s=1.0):
            if cell.kind != "kernel":
                return run_cell(cell)
            try:
                outcome = compare_backends(cell)
            except Exception as exc:  # a failure of the kernel is a status, never a crash of the check
                outcome = outcome_of_exception(exc)
    except CellTimeout as exc:  # a repeat of the alarm after the cell's own handler caught the first
        outcome = outcome_of_exception(exc)
    return _result(cell, outcome, started, t0)


def skipped(cell: Cell, reason: str) -> Result:
    """A `skipped` result with the reason (a cell the budget left no time for)."""
    now = _now()
    return Result(cell=cell, status=Status.SKIPPED, message=reason, provenance=provenance.collect(cell.device),
                  started_at=now, finished_at=now)


@dataclass
class PhaseRecord:
    """What one phase did: cells, statuses, seconds, the budget it had, and notes (e.g. rows left out)."""

    name: str
    planned: int = 0
    counts: "dict[str, int]" = field(default_factory=dict)
    wall_s: float = 0.0
    budget_s: float = 0.0
    est_s: float = 0.0
    notes: "list[str]" = field(default_factory=list)
    results: "list[Result]" = field(default_factory=list)
    finished: bool = True

    @property
    def state(self) -> str:
        """complete, cut by the budget (some cells skipped), failed (an error outside the cells), or
        interrupted (the hard deadline came while it ran)."""
        if not self.finished:
            return "interrupted"
        if any("failed:" in note for note in self.notes):
            return "failed"
        return "cut by budget" if self.counts.get("skipped") else "complete"


class Budget:
    """The run's clock: `t0`, the total, and the seconds kept at the end for the report."""

    def __init__(self, total_s: float, reserve_s: float, t0: "float | None" = None):
        self.t0 = time.time() if t0 is None else t0
        self.total_s, self.reserve_s = total_s, reserve_s

    def elapsed(self) -> float:
        return time.time() - self.t0

    def left(self) -> float:
        return self.total_s - self.elapsed()

    def phase_deadline(self, cap_s: float) -> float:
        """Wall-clock end of a phase starting now: its cap, or the run's end less the reserve if sooner."""
        return min(time.time() + cap_s, self.t0 + self.total_s - self.reserve_s)


def _say(text: str) -> None:
    print(text, flush=True)


def run_phase(name: str, cells: "list[Cell]", budget: Budget, cap_s: float, cell_timeout_s: float,
              estimate: Callable[[Cell], float], store: ResultStore, run_id: str,
              record: PhaseRecord, cleanup: "Callable[[], None] | None" = None) -> PhaseRecord:
    """Run `cells` in order until the phase's deadline: each gets min(`cell_timeout_s`, what is left) as its
    soft limit; one whose estimate exceeds what is left is stored as skipped with the reason. Every result
    is stored as it arrives and printed as a progress line."""
    start, deadline = time.time(), budget.phase_deadline(cap_s)
    record.planned, record.budget_s, record.finished = len(cells), round(max(0.0, deadline - start), 1), False
    record.est_s = round(sum(estimate(c) for c in cells), 1)
    _say(f"[{name}] {len(cells)} cells, {record.budget_s:.0f} s (estimated {record.est_s:.0f} s)")
    for i, cell in enumerate(cells, 1):
        left, est = deadline - time.time(), estimate(cell)
        if left < est:
            result = skipped(cell, f"time budget: {max(left, 0.0):.1f} s left of the {record.budget_s:.0f} s of "
                                   f"phase {name}, cell estimated {est:g} s")
        else:
            result = run_one(cell, timeout_s=max(1.0, min(cell_timeout_s, left)))
            if cleanup is not None:
                cleanup()
        store.put(result, run_id)
        record.results.append(result)
        record.counts[result.status.value] = record.counts.get(result.status.value, 0) + 1
        if result.status is not Status.SKIPPED or record.counts["skipped"] == 1:
            what = cell.label or cell.attention
            shape = f" L={cell.lq}" if cell.kind != "check" else ""
            why = result.message.splitlines()[0][:160] if result.status is not Status.OK and result.message else ""
            _say(f"[{name} {i}/{len(cells)} t={budget.elapsed():.0f}s] {what} {cell.pattern} {cell.dtype}"
                 f"{shape}{' ' + cell.mode if cell.mode else ''}: {result.status.value} ({result.wall_s:.1f} s)"
                 + (f" - {why}" if why else ""))
    record.wall_s, record.finished = round(time.time() - start, 1), True
    _say(f"[{name}] done in {record.wall_s:.1f} s: " + ", ".join(f"{n} {s}" for s, n in sorted(record.counts.items())))
    return record


def _cuda_cleanup(device: str) -> "Callable[[], None] | None":
    if torch.device(device).type != "cuda":
        return None

    def cleanup() -> None:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()

    return cleanup


# ---- outputs -------------------------------------------------------------------------------------------------

def write_leaderboard(store_path: Path, outdir: Path, fidelity_budget_s: float) -> "list[str]":
    """Render the leaderboard into a temporary folder, keep its index.html as leaderboard.html and zip the
    rest (per-attention pages, tables) into leaderboard-pages.zip, left out when over MAX_FILE_BYTES.
    Returns notes for the summary."""
    from cab.report import render_report

    notes = []
    with tempfile.TemporaryDirectory(prefix="cab-gpu-check-") as tmp:
        index = Path(render_report(store_path, Path(tmp) / "leaderboard", fidelity_budget_s=fidelity_budget_s))
        if index.stat().st_size > MAX_FILE_BYTES:
            notes.append(f"leaderboard.html left out: {index.stat().st_size / 2**20:.1f} MiB > 16 MiB")
        else:
            shutil.copyfile(index, outdir / "leaderboard.html")
        others = sorted(p for p in index.parent.rglob("*") if p.is_file() and p != index)
        archive = outdir / "leaderboard-pages.zip"
        with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for path in others:
                zf.write(path, path.relative_to(index.parent))
        if archive.stat().st_size > MAX_FILE_BYTES:
            archive.unlink()
            notes.append(f"leaderboard-pages.zip left out: over 16 MiB ({len(others)} pages and tables)")
        else:
            notes.append(f"leaderboard-pages.zip: {len(others)} per-attention pages and tables")
    return notes


def file_check(outdir: Path) -> "tuple[bool, list[tuple[str, int]]]":
    """(whether OUTDIR holds at most MAX_FILES files, each at most MAX_FILE_BYTES; [(name, bytes)])."""
    files = sorted((str(p.relative_to(outdir)), p.stat().st_size) for p in outdir.rglob("*") if p.is_file())
    return len(files) <= MAX_FILES and all(size <= MAX_FILE_BYTES for _, size in files), files


def _fmt_ms(value: "float | None") -> str:
    return "-" if value is None else f"{value:.3g}"


def _panel_table(results: "list[Result]", mode: str, lengths: "tuple[int, ...]") -> "list[str]":
    """Markdown: one row per panel label, one column per length: median ms / peak MiB, or the status."""
    by_row: "dict[str, dict[int, str]]" = {}
    for r in results:
        if r.cell.mode != mode:
            continue
        if r.status is Status.OK:
            peak = r.metrics.get("peak_mem_bytes")
            text = _fmt_ms(r.metrics.get("median_ms")) + (f" / {peak / 2**20:.0f}" if peak is not None else "")
        else:
            text = r.status.value
        by_row.setdefault(r.cell.display_name, {})[r.cell.lq] = text
    lines = [f"| {mode} | " + " | ".join(f"L={length}" for length in lengths) + " |",
             "|---|" + "---|" * len(lengths)]
    lines += [f"| {name} | " + " | ".join(cells.get(length, "") for length in lengths) + " |"
              for name, cells in by_row.items()]
    return lines


def render_summary(plan: Plan, env: dict, records: "list[PhaseRecord]", budget: Budget, notes: "list[str]",
                   files: "list[tuple[str, int]] | None", files_ok: "bool | None", finished: bool = True) -> str:
    """summary.md: environment, per-phase status, gate failures, kernel errors, the panel's timings, files."""
    packages = env.get("packages", {})
    lines = [f"# cab gpu-check: {plan.name} on {env.get('gpu') or env.get('device_name')}", "",
             f"{_dt.date.today().isoformat()}, device `{plan.device}`, plan `{plan.source}`; "
             f"{budget.elapsed():.0f} s of a {plan.budget_s:.0f} s budget"
             + ("" if finished else " - **stopped by the hard deadline**; what finished is below"), "",
             "## Environment", "",
             "| | |", "|---|---|"]
    for key in ("gpu", "driver", "capability", "torch", "triton", "cuda", "cudnn", "python", "cab_version",
                "git_sha", "cpu", "threads", "hostname"):
        lines.append(f"| {key} | {env.get(key)} |")
    lines.append("| packages | " + ", ".join(f"{m}: {v or 'absent'}" for m, v in packages.items()) + " |")
    lines += ["", "## Phases", "", "| phase | state | cells | statuses | seconds | budget s | estimated s |",
              "|---|---|---|---|---|---|---|"]
    for rec in records:
        statuses = ", ".join(f"{n} {s}" for s, n in sorted(rec.counts.items())) or "-"
        lines.append(f"| {rec.name} | {rec.state} | {rec.planned} | {statuses} | {rec.wall_s:.1f} | "
                     f"{rec.budget_s:.0f} | {rec.est_s:.0f} |")
    done = {rec.name for rec in records}
    lines += [f"| {name} | not reached | | | | | |" for name in PHASES if name not in done]
    for rec in records:
        lines += [f"- {rec.name}: {note}" for note in rec.notes]
    lines += [f"- {note}" for note in notes]
    gate = next((rec for rec in records if rec.name == "gate"), None)
    if gate is not None:
        failed = [r for r in gate.results if r.status not in (Status.OK, Status.SKIPPED, Status.UNSUPPORTED)]
        lines += ["", f"## Gate: {len(failed)} failing of {gate.planned}", ""]
        lines += [f"- {r.cell.attention} {r.cell.pattern} {r.cell.dtype}: {r.status.value} - "
                  f"{(r.message.splitlines() or [''])[0][:140]}" for r in failed[:25]]
        if len(failed) > 25:
            lines.append(f"- ... and {len(failed) - 25} more (the store has them all)")
    kernels = next((rec for rec in records if rec.name == "kernels"), None)
    if kernels is not None and kernels.results:
        lines += ["", "## Kernels: triton vs torch (relative error vs float64 torch: triton / torch)", "",
                  "| kernel | pattern | dtype | status | out | dq | dk | dv |", "|---|---|---|---|---|---|---|---|"]
        for r in kernels.results:
            errs = [f"{_fmt_ms(r.metrics.get(f'{n}_err_triton'))} / {_fmt_ms(r.metrics.get(f'{n}_err_torch'))}"
                    for n in ("out", "dq", "dk", "dv")]
            lines.append(f"| {r.cell.display_name} | {r.cell.pattern} | {r.cell.dtype} | {r.status.value} | "
                         + " | ".join(errs) + " |")
    panel = next((rec for rec in records if rec.name == "panel"), None)
    if panel is not None and panel.results:
        lines += ["", f"## Panel: {plan.panel.pattern} {plan.panel.dtype}, B={plan.panel.batch} H={plan.panel.heads} "
                  f"D={plan.panel.head_dim}; median ms / peak MiB", ""]
        for mode in plan.panel.modes:
            lines += _panel_table(panel.results, mode, plan.panel.lengths) + [""]
    lines += ["", "## Files", ""]
    if files is None:
        lines.append("not checked (the run stopped before the end)")
    else:
        lines.append(f"{len(files) + 1} files with this one (limit {MAX_FILES}), largest "
                     f"{max((s for _, s in files), default=0) / 2**20:.2f} MiB (limit 16 MiB): "
                     + ("**within the limits**" if files_ok else "**OVER THE LIMITS**"))
        lines += [f"- {name}: {size / 1024:.1f} KiB" for name, size in files]
    return "\n".join(lines) + "\n"


# ---- the whole check -----------------------------------------------------------------------------------------

@dataclass
class CheckRun:
    """The outcome of run_gpu_check: where the files are, the phases, whether the files fit the limits."""

    outdir: Path
    records: "list[PhaseRecord]"
    files: "list[tuple[str, int]]"
    files_ok: bool
    wall_s: float

    @property
    def counts(self) -> "dict[str, int]":
        total: dict[str, int] = {}
        for rec in self.records:
            for status, n in rec.counts.items():
                total[status] = total.get(status, 0) + n
        return total


def _prepare_outdir(outdir: Path, force: bool) -> None:
    outdir.mkdir(parents=True, exist_ok=True)
    present = [p for p in outdir.iterdir() if p.name != "gpu-check.log"]
    if present and not force:
        raise FileExistsError(f"{outdir} is not empty ({present[0].name}, ...); name an empty folder or pass --force")
    for path in present:
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def _enable_interpreter(device: str) -> "str | None":
    """On CPU, turn on the Triton interpreter (for the kernels phase) unless triton is already imported;
    returns a note when it could not."""
    if torch.device(device).type != "cpu" or os.environ.get("TRITON_INTERPRET"):
        return None
    if "triton" in sys.modules:
        return "triton was imported before the check: the kernels phase runs without the interpreter"
    os.environ["TRITON_INTERPRET"] = "1"
    return None


def _watchdog(seconds: float, write: Callable[[], None]) -> threading.Timer:
    """At the run's end, write the summary of what finished and exit (status 124) whatever still runs."""

    def fire() -> None:
        try:
            _say(f"[gpu-check] hard deadline reached after {seconds:.0f} s; writing the summary and stopping")
            write()
        finally:
            os._exit(124)

    timer = threading.Timer(max(seconds, 0.0), fire)
    timer.daemon = True
    timer.start()
    return timer


def run_gpu_check(outdir: "str | Path", plan: Plan, budget_s: "float | None" = None, t0: "float | None" = None,
                  force: bool = False, render: bool = True) -> CheckRun:
    """Run the plan's phases into `outdir` within its budget (or `budget_s`); see the module docstring."""
    if budget_s is not None:
        plan = replace(plan, budget_s=float(budget_s))
    outdir = Path(outdir)
    _prepare_outdir(outdir, force)
    notes = [n for n in (_enable_interpreter(plan.device),) if n]
    budget = Budget(plan.budget_s, min(plan.reserve_s, plan.budget_s / 3), t0)
    unavailable = device_unavailable(plan.device)
    if unavailable:
        raise ValueError(f"cannot run the check on {plan.device}: {unavailable}")
    records: list[PhaseRecord] = []
    env: dict = {"device": plan.device}
    summary_path = outdir / SUMMARY_NAME

    def emergency_summary() -> None:
        store_file = outdir / STORE_NAME
        if store_file.exists():  # move what is committed out of the write-ahead log into the store file
            with contextlib.closing(sqlite3.connect(store_file, timeout=5)) as conn:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        summary_path.write_text(render_summary(plan, env, records, budget, notes, None, None, finished=False))

    watchdog = _watchdog(budget.left(), emergency_summary)
    try:
        start = time.time()
        _say(f"[gpu-check] plan {plan.source or plan.name}: device {plan.device}, budget {plan.budget_s:.0f} s")
        env = environment(plan.device)
        records.append(PhaseRecord("environment", planned=1, counts={"ok": 1}, wall_s=round(time.time() - start, 1),
                                   est_s=plan.environment_est_s))
        _say(f"[environment] {env.get('gpu') or env.get('device_name')}, torch {env['torch']}, triton {env['triton']}, "
             f"CUDA {env['cuda']}, driver {env['driver']}; "
             + ", ".join(f"{m} {v or 'absent'}" for m, v in env['packages'].items()))
        (outdir / "environment.json").write_text(json.dumps(jsonable(env), indent=2) + "\n")
        registry.discover([])
        rows, absent = panel_rows(plan)
        phases = [("gate", gate_cells(plan), plan.gate, []),
                  ("kernels", kernel_cells(plan), plan.kernels, []),
                  ("panel", panel_cells(plan, rows), plan.panel, absent)]
        store_path = outdir / STORE_NAME
        with ResultStore(store_path) as store:
            run_id = store.start_run(plan.source or plan.name, " ".join(sys.argv), sum(len(c) for _, c, _, _ in phases),
                                     {**jsonable(env), "config_name": plan.name, "plan": plan.source,
                                      "budget_s": plan.budget_s}, executor="local")
            done = 0
            try:
                for name, cells, phase, phase_notes in phases:
                    record = PhaseRecord(name, notes=[f"left out: {n}" for n in phase_notes])
                    records.append(record)
                    run_phase(name, cells, budget, phase.budget_s, phase.cell_timeout_s,
                              lambda c: cell_estimate(plan, c), store, run_id, record,
                              cleanup=_cuda_cleanup(plan.device))
                    done += len(record.results)
            finally:
                store.finish_run(run_id, done, "finished")
        start = time.time()
        report = PhaseRecord("report", planned=1, budget_s=round(budget.left(), 1), est_s=plan.reserve_s)
        records.append(report)
        if render:
            _say(f"[report] rendering the leaderboard ({budget.left():.0f} s left)")
            try:
                report.notes += write_leaderboard(store_path, outdir, min(plan.fidelity_budget_s,
                                                                          max(0.0, budget.left() / 4)))
                report.counts = {"ok": 1}
            except Exception as exc:  # a report that fails must not lose the summary
                report.notes.append(f"failed: leaderboard: {type(exc).__name__}: {str(exc)[:300]}")
                report.counts = {"error": 1}
        else:
            report.counts = {"skipped": 1}
            report.notes.append("leaderboard not rendered (render=False)")
        report.wall_s = round(time.time() - start, 1)
        ok, files = file_check(outdir)
        summary_path.write_text(render_summary(plan, env, records, budget, notes, files, ok))
        ok, files = file_check(outdir)
        _say(f"[gpu-check] {len(files)} files in {outdir} ({'within' if ok else 'OVER'} the limits of {MAX_FILES} "
             f"files and 16 MiB each), {budget.elapsed():.0f} s of {plan.budget_s:.0f} s")
        return CheckRun(outdir, records, files, ok, round(budget.elapsed(), 1))
    finally:
        watchdog.cancel()


def summarize_plan(plan: Plan) -> str:
    """One line per phase: cells and estimated seconds, and the total against the budget."""
    est = estimate_plan(plan)
    parts = [f"{name}: {est.cells.get(name, '-')} cells, {est.seconds[name]:.0f} s"
             for name in ("environment", "gate", "kernels", "panel", "report")]
    return (f"{plan.source or plan.name}: {est.total_cells} cells, estimated "
            f"{est.total_s:.0f} s of {plan.budget_s:.0f} s\n  " + "\n  ".join(parts))

__all__ = ["Budget", "CheckRun", "Plan", "PlanError", "PlanEstimate", "compare_backends", "default_plan",
           "estimate_plan", "gate_cells", "kernel_cells", "load_plan", "panel_cells", "run_gpu_check", "run_phase",
           "summarize_plan"]
