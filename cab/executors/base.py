"""The executor interface: cells in, Results out as each finishes; the driver sees nothing else."""

from __future__ import annotations

import abc
from typing import Callable, ClassVar, Iterable, Iterator, Sequence

from cab.cells import Cell, Result

CellCallback = Callable[[Cell], None]


class Executor(abc.ABC):
    """Runs cells and yields one Result per cell, in the order they finish (not necessarily submitted).

    `timeout_s` is the per-cell limit (None: no limit); `plugins` are the --plugin specs every process
    that runs a cell must load. An executor never raises for a failing cell: the failure is the Result's
    status. KeyboardInterrupt propagates after the executor has stopped what it started."""

    name: ClassVar[str] = ""

    def __init__(self, *, timeout_s: "float | None" = None, plugins: Sequence[str] = ()):
        self.timeout_s = timeout_s
        self.plugins = list(plugins)

    @abc.abstractmethod
    def run(self, cells: Iterable[Cell], on_start: "CellCallback | None" = None) -> Iterator[Result]:
        """Run `cells`, calling `on_start(cell)` when each starts, and yield each Result as it finishes."""

    def close(self) -> None:
        """Release workers or connections (nothing to do for executors that hold none)."""

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
