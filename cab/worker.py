"""Entry point of an isolated cell process: `python -m cab.worker JOB_JSON RESULT_JSON`.

JOB_JSON holds the cell, the plugin specs to load, the soft time limit and the parent's pid. The Result
is written to RESULT_JSON atomically (temporary file + rename), so a worker killed mid-write leaves no
half result. Exit status 0 with a result; EXIT_OOM after a MemoryError that escaped the cell.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
from pathlib import Path
from typing import Sequence

EXIT_OOM = 3
_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: "int | None") -> None:
    """Ask Linux to SIGKILL this worker when its parent dies, so a killed driver leaves no orphan
    measuring on a busy CPU; exit at once if the parent is already gone."""
    if not sys.platform.startswith("linux") or parent_pid is None:
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:
        os._exit(1)


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def main(argv: "Sequence[str] | None" = None) -> int:
    """Load the plugins, run the cell in this process, write its Result."""
    job_path, result_path = (sys.argv[1:] if argv is None else list(argv))
    job = json.loads(Path(job_path).read_text())
    _die_with_parent(job.get("parent_pid"))

    from cab import registry
    from cab.cells import Cell
    from cab.runner import run_cell
    from cab.status import Status

    errors = registry.discover(job.get("plugins") or [])
    for err in errors:
        print(f"cab worker: plugin failed to load: {err.source}\n{err.traceback}", file=sys.stderr)
    result = run_cell(Cell.from_dict(job["cell"]), job.get("timeout_s"))
    if errors and result.status is Status.ERROR:
        result.message += "".join(f"\n\nplugin {e.source} failed to load: {e.message}" for e in errors)
    _write_atomically(Path(result_path), json.dumps(result.to_dict()))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except MemoryError:
        os._exit(EXIT_OOM)
