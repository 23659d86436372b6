"""In-process executor: each cell runs in this process through cab.runner.run_cell.

Its time limit is soft: a SIGALRM interrupts Python code but not a long native call (one big matmul),
and a crash (segfault, OOM kill) of a cell takes the whole run down. Use `subprocess` for isolation."""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

from cab import registry
from cab.cells import Cell, Result
from cab.executors.base import CellCallback, Executor
from cab.runner import run_cell


class LocalExecutor(Executor):
    """Runs cells one after another in the current process (fast: no interpreter start per cell)."""

    name = "local"

    def __init__(self, *, timeout_s: "float | None" = None, plugins: Sequence[str] = ()):
        super().__init__(timeout_s=timeout_s, plugins=plugins)
        # already loaded by whoever read the config; loading is idempotent and keeps the errors
        self.plugin_errors = registry.discover(self.plugins)

    def run(self, cells: Iterable[Cell], on_start: "CellCallback | None" = None) -> Iterator[Result]:
        for cell in cells:
            if on_start is not None:
                on_start(cell)
            yield run_cell(cell, self.timeout_s)
