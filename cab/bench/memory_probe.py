"""Peak resident memory of one bench cell, measured in a fresh process forked for that cell alone.

`cab.bench.memory` forks it from cab's forkserver (cab.executors.forkserver), whose server process has imported
torch, torch._dynamo and cab (this module, among its preloads, imports every built-in attention) but never runs a
torch operation, so forking it is safe and a child starts with an untouched allocator, without paying torch's
import for every cell. The child freezes what it inherited (gc.freeze) before anything else, so its collections
never walk torch's and cab's objects. The child (`measure_in_child`) serves every allocation above 64 KiB with
mmap (so a freed tensor never hides a later peak in resident heap pages), builds the module and inputs, runs the
mode once at a tiny shape to load libraries, resets the kernel's RSS high-water mark (write "5" to
/proc/self/clear_refs), takes the baseline VmRSS just before the measured call, runs the mode once and reads
VmHWM: peak_mem_bytes = VmHWM - baseline. Where the reset is refused, VmHWM counts from the fork, so the figure is
an upper bound and says so (mem_upper_bound).
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import re
import traceback
from pathlib import Path

import torch

from cab.attention import load_builtin_attentions
from cab.bench.inputs import make_inputs
from cab.bench.workload import build_attention, needs_grad, prepare_mode
from cab.cells import Cell, jsonable
from cab.failures import is_oom
from cab.metrics import Memory
from cab.registry import discover

WARMUP_LENGTH = 32  # the warm-up call's sequence length: enough to load every kernel, too small to matter
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h


def read_memory_status() -> "dict[str, int]":
    """VmRSS and VmHWM of this process in bytes, from /proc/self/status."""
    fields = dict(re.findall(r"^(VmRSS|VmHWM):\s+(\d+)\s+kB", _STATUS.read_text(), flags=re.MULTILINE))
    if set(fields) != {"VmRSS", "VmHWM"}:
        raise OSError("/proc/self/status has no VmRSS/VmHWM lines")
    return {name: int(kib) * 1024 for name, kib in fields.items()}


def reset_high_water_mark() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False when the kernel refuses."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def probe(cell: Cell) -> Memory:
    """Memory metrics of one call of the cell's mode in this (fresh) process."""
    attn = build_attention(cell)
    grad = needs_grad(cell.mode)
    tiny = dataclasses.replace(cell, batch=1, lq=min(cell.lq, WARMUP_LENGTH), lk=min(cell.lk, WARMUP_LENGTH))
    warm_fn, _ = prepare_mode(attn, make_inputs(tiny, grad), cell.mode)
    warm_fn()
    del warm_fn
    fn, _ = prepare_mode(attn, make_inputs(cell, grad), cell.mode)
    gc.collect()
    was_reset = reset_high_water_mark()
    before = read_memory_status()
    kept = fn()
    after = read_memory_status()
    memory = Memory(
        mem_status="ok", peak_mem_bytes=after["VmHWM"] - before["VmRSS"], mem_baseline_bytes=before["VmRSS"],
        mem_method="vmhwm_clear_refs" if was_reset else "vmhwm_since_start",
        mem_upper_bound=None if was_reset else True,
        # what the forward leaves alive for backward: output and saved tensors
        saved_for_backward_bytes=after["VmRSS"] - before["VmRSS"] if cell.mode == "fwd" else None,
    )
    del kept
    return memory


def _limit_mmap_threshold() -> bool:
    """glibc: serve allocations above 64 KiB with mmap, returned to the kernel on free (M_MMAP_THRESHOLD)."""
    try:
        return ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 64 * 1024) == 1
    except (OSError, AttributeError):
        return False


def measure_in_child(request: dict, conn) -> None:
    """Forkserver target: probe the requested cell and send its metrics (or the failure) through `conn`."""
    # Everything inherited from the forkserver (torch, cab, every attention) moves to the permanent generation,
    # so the probe's gc.collect() scans only what this child creates: a full collection here took 0.2-0.5 s a
    # cell (most of a fast cell's memory pass) and wrote to every inherited object's page (copy on write).
    gc.freeze()
    try:
        _limit_mmap_threshold()
        discover(request.get("plugins") or [])
        if request.get("threads"):
            torch.set_num_threads(int(request["threads"]))
        memory = probe(Cell.from_dict(request["cell"]))
    except Exception as exc:
        if is_oom(exc):
            memory = Memory(mem_status="oom", mem_message=f"{type(exc).__name__}: {str(exc)[:500]}")
        else:
            tail = traceback.format_exc()[-2000:]
            memory = Memory(mem_status="error", mem_message=f"{type(exc).__name__}: {exc}\n{tail}")
    conn.send(jsonable(memory.to_dict()))
    conn.close()


load_builtin_attentions()  # imported once by the forkserver, so children do not import them again
