"""Cell kinds: what a cell of each kind runs, and how the progress bar names it.

A kind registers itself where it is implemented, the way config sections do:

    from cab.kinds import register_cell_kind

    @register_cell_kind("check")
    def check_cell(cell: Cell) -> Outcome: ...

The built-in kinds' modules (KIND_MODULES) are imported, and the entry points of group "cab.cell_kinds"
loaded, on the first lookup; the runner then runs any cell through `run_kind`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from cab.cells import Cell, Outcome
from cab.registries import Registry

KIND_MODULES = ("cab.check.cell_kind", "cab.bench.cell_kind", "cab.training.cell_kind")


def _default_description(cell: Cell) -> str:
    return f"{cell.display_name} {cell.pattern} {cell.kind}"


@dataclass(frozen=True)
class CellKind:
    """One kind of cell: `run(cell) -> Outcome`, `describe(cell) -> str` (a short name for progress),
    `runs_alone` for kinds whose measurements need the machine to themselves (the pool runs them alone), and
    `lane(cell) -> str | None`: cells in the same lane run one at a time, on the same worker where it is free
    (see cab.executors.pool)."""

    name: str
    run: Callable[[Cell], Outcome]
    describe: Callable[[Cell], str] = _default_description
    runs_alone: bool = False
    lane: "Callable[[Cell], str | None] | None" = None


CELL_KINDS: "Registry[CellKind]" = Registry("cell kind", modules=KIND_MODULES, entry_points="cab.cell_kinds")


def register_cell_kind(name: str, describe: "Callable[[Cell], str] | None" = None, runs_alone: bool = False,
                       lane: "Callable[[Cell], str | None] | None" = None,
                       ) -> "Callable[[Callable[[Cell], Outcome]], Callable[[Cell], Outcome]]":
    """Decorator registering the function that runs cells of kind `name`."""

    def decorate(run: Callable[[Cell], Outcome]) -> Callable[[Cell], Outcome]:
        kind = CellKind(name, run, describe or _default_description, runs_alone, lane)
        CELL_KINDS.add(name, kind, f"{run.__module__}.{run.__qualname__}")
        return run

    return decorate


def run_kind(cell: Cell) -> Outcome:
    """Run `cell` with its kind's function; an unknown kind raises UnknownName."""
    kind = CELL_KINDS.get(cell.kind)
    return kind.run(cell)


def describe(cell: Cell) -> str:
    """The short name of `cell` its kind gives (for the progress bar)."""
    return CELL_KINDS.get(cell.kind).describe(cell)
