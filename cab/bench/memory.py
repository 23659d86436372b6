"""Peak memory of one bench cell, in its own pass (never inside the timing loop).

CPU: a fresh process per cell, forked from cab's warm forkserver (cab.executors.forkserver: torch,
torch._dynamo and cab already imported; see `cab.bench.memory_probe`), reads its resident high-water mark,
since the allocator's freed-and-reused memory makes in-process readings low. CUDA: the caching allocator's
peak statistics around one call, in this process."""

from __future__ import annotations

import gc
import multiprocessing
import signal

import torch

from cab.bench.inputs import make_inputs
from cab.bench.memory_probe import measure_in_child
from cab.bench.workload import build_attention, needs_grad, prepare_mode
from cab.cells import Cell
from cab.executors import forkserver
from cab.failures import is_oom
from cab.metrics import Memory
from cab.registry import loaded_plugin_specs

DEFAULT_PROBE_TIMEOUT_S = 600.0


def measure_memory(cell: Cell) -> Memory:
    """Memory metrics of one call of the cell's mode: peak_mem_bytes above the pre-call baseline,
    mem_method, mem_status ("ok", "oom", "timeout" or "error", with mem_message when not ok), and for fwd
    saved_for_backward_bytes (output and tensors kept for backward)."""
    if torch.device(cell.device).type == "cuda":
        return cuda_memory(cell)
    return cpu_memory(cell, timeout_s=float(cell.options.get("memory_timeout_s", DEFAULT_PROBE_TIMEOUT_S)))


def cpu_memory(cell: Cell, timeout_s: float) -> Memory:
    """Run the memory probe on the cell in a process of its own and return its metrics."""
    request = {"cell": cell.to_dict(), "plugins": loaded_plugin_specs(), "threads": torch.get_num_threads()}
    receiver, sender = multiprocessing.Pipe(duplex=False)
    # the warm server has torch._dynamo loaded too: a probe that imported it itself (torch does on the first
    # activation checkpoint or compile-disabled call) spent about 1.1 s of every memory pass doing so
    child = forkserver.start(measure_in_child, (request, sender), name="cab-memory-probe", daemon=True)
    sender.close()
    try:
        if receiver.poll(timeout_s):
            try:
                metrics = receiver.recv()
            except EOFError:  # the child died before it could answer
                metrics = None
            child.join(30)
            if metrics is not None:
                return Memory.from_dict(metrics)
        elif child.is_alive():
            return Memory(mem_status="timeout", mem_message=f"memory probe exceeded {timeout_s:g} s")
        child.join(30)
        if child.exitcode == -signal.SIGKILL:
            return Memory(mem_status="oom", mem_message="memory probe killed by SIGKILL (the kernel's OOM killer)")
        return Memory(mem_status="error", mem_message=f"memory probe exited with {child.exitcode} without a result")
    finally:
        receiver.close()
        if child.is_alive():
            child.kill()
            child.join(10)


def cuda_memory(cell: Cell) -> Memory:
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
        memory = Memory(
            mem_status="ok", peak_mem_bytes=torch.cuda.max_memory_allocated(device) - baseline,
            mem_baseline_bytes=baseline, mem_method="cuda_allocator",
            saved_for_backward_bytes=torch.cuda.memory_allocated(device) - baseline if cell.mode == "fwd" else None,
        )
        del kept
        return memory
    except Exception as exc:
        if not is_oom(exc):
            raise
        return Memory(mem_status="oom", mem_message=f"{type(exc).__name__}: {str(exc)[:500]}")
    finally:
        torch.cuda.empty_cache()
