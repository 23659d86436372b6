"""Peak memory of one bench cell, in its own pass (never inside the timing loop).

CPU: a fresh subprocess (`python -m cab.bench.memory_probe`) reads its resident high-water mark, since
the allocator's freed-and-reused memory makes in-process readings low. CUDA: the caching allocator's peak
statistics around one call, in this process."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from cab.bench.inputs import make_inputs
from cab.bench.workload import build_attention, needs_grad, prepare_mode
from cab.cells import Cell
from cab.registry import loaded_plugin_specs
from cab.runner import is_oom

DEFAULT_PROBE_TIMEOUT_S = 600.0
# glibc: serve every allocation above 64 KiB with mmap and give it back on free, so a freed tensor never
# hides a later peak inside already-resident heap pages (and the threshold does not adapt upwards)
_PROBE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
_REPO_ROOT = Path(__file__).resolve().parents[2]


def measure_memory(cell: Cell) -> dict:
    """Memory metrics of one call of the cell's mode: peak_mem_bytes above the pre-call baseline,
    mem_method, mem_status ("ok", "oom", "timeout" or "error", with mem_message when not ok), and for fwd
    saved_for_backward_bytes (output and tensors kept for backward)."""
    if torch.device(cell.device).type == "cuda":
        return cuda_memory(cell)
    return cpu_memory(cell, timeout_s=float(cell.options.get("memory_timeout_s", DEFAULT_PROBE_TIMEOUT_S)))


def cpu_memory(cell: Cell, timeout_s: float) -> dict:
    """Run the memory probe on the cell in a fresh Python process and return its metrics."""
    request = {"cell": cell.to_dict(), "plugins": loaded_plugin_specs(), "threads": torch.get_num_threads()}
    pythonpath = os.pathsep.join(p for p in (str(_REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, **_PROBE_ENV, "PYTHONPATH": pythonpath}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "cab.bench.memory_probe"], input=json.dumps(request), capture_output=True,
            text=True, timeout=timeout_s, env=env,
        )
    except subprocess.TimeoutExpired:
        return {"mem_status": "timeout", "mem_message": f"memory probe exceeded {timeout_s:g} s"}
    if proc.returncode == -signal.SIGKILL:
        return {"mem_status": "oom", "mem_message": "memory probe killed by SIGKILL (the kernel's OOM killer)"}
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        return {"mem_status": "error",
                "mem_message": f"memory probe exited with {proc.returncode}: {proc.stderr.strip()[-2000:]}"}
    return json.loads(lines[-1])


def cuda_memory(cell: Cell) -> dict:
    """Allocator peak of one call after a warm-up call: max_memory_allocated - memory_allocated before it."""
    device = torch.device(cell.device)
    try:
        attn = build_attention(cell)
        fn, before_sample = prepare_mode(attn, make_inputs(cell, needs_grad(cell.mode)), cell.mode)
        fn()  # loads kernels and runs autotuners, whose workspaces must not count
        if before_sample is not None:
            before_sample()
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        kept = fn()
        torch.cuda.synchronize(device)
        metrics = {
            "mem_status": "ok",
            "peak_mem_bytes": torch.cuda.max_memory_allocated(device) - baseline,
            "mem_baseline_bytes": baseline,
            "mem_method": "cuda_allocator",
        }
        if cell.mode == "fwd":
            metrics["saved_for_backward_bytes"] = torch.cuda.memory_allocated(device) - baseline
        del kept
        return metrics
    except Exception as exc:
        if not is_oom(exc):
            raise
        return {"mem_status": "oom", "mem_message": f"{type(exc).__name__}: {str(exc)[:500]}"}
    finally:
        torch.cuda.empty_cache()
