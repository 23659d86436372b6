"""Peak resident memory of one bench cell, measured in a fresh process: `python -m cab.bench.memory_probe`.

Reads {"cell": {...}, "plugins": [...], "threads": n} as JSON on stdin and writes one JSON line of memory
metrics on stdout. The process builds the module and inputs, runs the mode once at a tiny shape to load
libraries, resets the kernel's RSS high-water mark (write "5" to /proc/self/clear_refs), takes the
baseline VmRSS just before the measured call, runs the mode once and reads VmHWM:
peak_mem_bytes = VmHWM - baseline. Where the reset is refused, VmHWM still counts from the process start
(kept small by the tiny warm-up), so the figure is an upper bound and says so (mem_upper_bound).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import re
import sys
from pathlib import Path

import torch

from cab.bench.inputs import make_inputs
from cab.bench.workload import build_attention, needs_grad, prepare_mode
from cab.cells import Cell, jsonable
from cab.registry import discover
from cab.runner import is_oom

WARMUP_LENGTH = 32  # the warm-up call's sequence length: enough to load every kernel, too small to matter
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


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


def probe(cell: Cell) -> dict:
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
    metrics = {
        "mem_status": "ok",
        "peak_mem_bytes": after["VmHWM"] - before["VmRSS"],
        "mem_baseline_bytes": before["VmRSS"],
        "mem_method": "vmhwm_clear_refs" if was_reset else "vmhwm_since_start",
    }
    if not was_reset:
        metrics["mem_upper_bound"] = True
    if cell.mode == "fwd":  # what the forward leaves alive for backward: output and saved tensors
        metrics["saved_for_backward_bytes"] = after["VmRSS"] - before["VmRSS"]
    del kept
    return metrics


def main() -> int:
    request = json.loads(sys.stdin.read())
    discover(request.get("plugins") or [])
    if request.get("threads"):
        torch.set_num_threads(int(request["threads"]))
    cell = Cell.from_dict(request["cell"])
    try:
        metrics = probe(cell)
    except Exception as exc:
        if not is_oom(exc):
            raise
        metrics = {"mem_status": "oom", "mem_message": f"{type(exc).__name__}: {str(exc)[:500]}"}
    print(json.dumps(jsonable(metrics)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
