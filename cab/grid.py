"""Expansion of a validated config into cells, in a deterministic order with stable keys.

Each section has one expander that lays out its axes (lists) and crosses them, so the grid size is known
before any cell is built and an oversized grid fails fast with a located ConfigError.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Callable, Iterator

from cab.cells import Cell
from cab.config import BenchSection, CheckSection, Config, Section, load_config

# An expander returns (number of cells, iterator over them) for one section.
Expansion = tuple[int, Iterator[Cell]]


def _check_cells(config: Config, section: CheckSection) -> Expansion:
    """One conformance cell per attention x pattern; shapes are the check's own, so they stay defaults."""
    entries, patterns = config.attention_entries(section), config.patterns_of(section)
    options = {"threads": config.resolved_threads}

    def cells() -> Iterator[Cell]:
        for entry, pattern in itertools.product(entries, patterns):
            yield Cell(kind="check", attention=entry.name, pattern=pattern.value, hparams=dict(entry.hparams),
                       dtype=section.dtype, device=config.device, seed=config.seed, label=entry.display_label,
                       options=dict(options))

    return len(entries) * len(patterns), cells()


def _bench_cells(config: Config, section: BenchSection) -> Expansion:
    """Timing cells: attention x pattern x length x mode x dtype; Lk = length for self patterns and
    round(length * kv_ratio) for cross patterns."""
    entries, patterns = config.attention_entries(section), config.patterns_of(section)
    lengths = list(dict.fromkeys(section.lengths))
    modes, dtypes = list(dict.fromkeys(section.modes)), list(dict.fromkeys(section.dtypes))
    options = {"threads": config.resolved_threads, "min_run_time_s": section.min_run_time_s,
               "memory": section.memory}
    kv_heads = section.kv_heads or section.heads

    def cells() -> Iterator[Cell]:
        for entry, pattern, length, mode, dtype in itertools.product(entries, patterns, lengths, modes, dtypes):
            lk = max(1, round(length * section.kv_ratio)) if pattern.cross else length
            yield Cell(kind="bench", attention=entry.name, pattern=pattern.value, hparams=dict(entry.hparams),
                       batch=section.batch, heads=section.heads, kv_heads=kv_heads, lq=length, lk=lk,
                       head_dim=section.head_dim, dtype=dtype, device=config.device, mode=mode, seed=config.seed,
                       label=entry.display_label, options=dict(options))

    size = math.prod((len(entries), len(patterns), len(lengths), len(modes), len(dtypes)))
    return size, cells()


EXPANDERS: dict[str, Callable[[Config, Section], Expansion]] = {"check": _check_cells, "bench": _bench_cells}


def expand(config: "Config | str | Path") -> "list[Cell]":
    """All cells of a config (or of a config file), sections in `SECTION_ORDER`; the same config gives
    the same cells in the same order on every run. Raises ConfigError above `max_cells`."""
    if not isinstance(config, Config):
        config = load_config(config)
    expansions = {name: EXPANDERS[name](config, section) for name, section in config.sections().items()}
    total = sum(size for size, _ in expansions.values())
    if total > config.max_cells:
        sizes = ", ".join(f"{name}: {size:,}" for name, (size, _) in expansions.items())
        raise config.error(
            f"the grid expands to {total:,} cells ({sizes}), over max_cells = {config.max_cells:,}; "
            "shrink the lists or raise max_cells", ("max_cells",) if "max_cells" in config.model_fields_set else ())
    return [cell for _, cells in expansions.values() for cell in cells]


__all__ = ["EXPANDERS", "expand"]
