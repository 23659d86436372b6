"""Expansion of a validated config into cells, in a deterministic order with stable keys.

Each section has one expander that lays out its axes and returns the number of cells with an iterator
over them, so the grid size is known before any cell is built and an oversized grid fails fast with a
located ConfigError (`max_cells` in the config raises the bound).

Sections are pluggable: a module adds one with

    from cab.grid import register_section
    register_section("tasks", TasksSection, expand_tasks)  # as cab.training.expand does

where `TasksSection` subclasses `cab.config.Section` (so it may override `attentions`, `exclude` and
`patterns`) and `expand_tasks(config, section) -> (count, iterator of Cell)` lays its cells out (it may
raise `config.error(message, key_path)` for a located error). The config then accepts a top-level
`tasks:` key; sections expand in registration order, after `check` and `bench`. A module listed in
`cab.config.SECTION_MODULES`, or installed as an entry point of group "cab.sections", is imported when a
config names a section that is not registered yet.
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path
from typing import Callable, Iterator

from cab.cells import Cell
from cab.config import (
    SECTIONS,
    BenchSection,
    CheckSection,
    Config,
    Section,
    load_config,
    register_section_model,
)
from cab.patterns import Pattern
from cab.registries import Registry
from cab.registry import get_spec, versions_of

# An expander returns (number of cells, iterator over them) for one section.
Expansion = tuple[int, Iterator[Cell]]
Expander = Callable[[Config, Section], Expansion]

DECODE_MODE = "decode"


CHECK_THREADS = 1  # the suite sets one thread itself; the published-shape probes are a few calls each


def _check_cells(config: Config, section: CheckSection) -> Expansion:
    """One conformance cell per attention x pattern, on one CPU thread (so a pool runs one per core); shapes
    are the check's own, so they stay defaults. With seed 0 (the gate's run) a cell also carries, as option
    `published`, the shapes the grid's bench cells publish for its configuration, which it probes (see
    cab.check.cell_kind)."""
    entries, patterns = config.attention_entries(section), config.patterns_of(section)
    published = published_by_bench(config, section.dtype) if config.seed == 0 else {}

    def cells() -> Iterator[Cell]:
        for entry, pattern in itertools.product(entries, patterns):
            options: dict = {"threads": CHECK_THREADS}
            shapes = published.get((entry.name, _hparams_key(entry.hparams), pattern.value))
            if shapes:
                options["published"] = shapes
            yield Cell(kind="check", attention=entry.name, pattern=pattern.value, hparams=dict(entry.hparams),
                       dtype=section.dtype, device=config.device, seed=config.seed, label=entry.display_label,
                       versions=versions_of(entry.name, entry.hparams), options=options)

    return len(entries) * len(patterns), cells()


def _hparams_key(hparams: dict) -> str:
    return json.dumps(hparams, sort_keys=True, default=repr)


def published_by_bench(config: Config, dtype: str) -> "dict[tuple[str, str, str], list[dict]]":
    """{(attention, hparams as JSON, pattern): [shape, ...]}: the distinct shapes the config's bench cells
    time in `dtype` (whole-sequence modes; decode cells probe a decoding step themselves), each a dict of
    batch, heads, kv_heads, lq, lk, head_dim with the cell's mode and cost budgets (a shape the budgets
    skip is not probed)."""
    section = config.sections().get("bench")
    if not isinstance(section, BenchSection):
        return {}
    found: dict[tuple[str, str, str], list[dict]] = {}
    for cell in _bench_cells(config, section)[1]:
        if cell.mode == DECODE_MODE or cell.dtype != dtype:
            continue
        shape = {"batch": cell.batch, "heads": cell.heads, "kv_heads": cell.kv_heads, "lq": cell.lq, "lk": cell.lk,
                 "head_dim": cell.head_dim, "mode": cell.mode,
                 **{k: cell.options[k] for k in ("max_memory_bytes", "max_flops") if k in cell.options}}
        shapes = found.setdefault((cell.attention, _hparams_key(cell.hparams), cell.pattern), [])
        if not any(_same_size(shape, other) for other in shapes):
            shapes.append(shape)
    return found


def _same_size(a: dict, b: dict) -> bool:
    return all(a[k] == b[k] for k in ("batch", "heads", "kv_heads", "lq", "lk", "head_dim"))


def bench_options(config: Config, section: BenchSection) -> dict:
    """Options every bench cell of the section carries (they steer the runner; none enters the key)."""
    options = {"threads": config.resolved_threads, "min_run_time_s": section.min_run_time_s,
               "memory": section.memory}
    optional = {"min_samples": section.min_samples, "warmup_s": section.warmup_s,
                "min_warmup_calls": section.min_warmup_calls, "trials": section.trials if section.trials > 1 else None,
                "max_memory_bytes": section.max_memory_bytes, "max_flops": section.max_flops}
    options.update({name: value for name, value in optional.items() if value is not None})
    return options


def _bench_cells(config: Config, section: BenchSection) -> Expansion:
    """Timing cells: attention x pattern x length x mode x dtype, decode only for causal patterns; Lk =
    length for self patterns and round(length * kv_ratio) for cross patterns. With `trials` > 1 the cells
    come in an order shuffled by the config's seed."""
    entries, patterns = config.attention_entries(section), config.patterns_of(section)
    lengths = list(dict.fromkeys(section.lengths))
    modes, dtypes = list(dict.fromkeys(section.modes)), list(dict.fromkeys(section.dtypes))
    options = bench_options(config, section)
    kv_list = section.kv_heads_list
    kv_of = {e.name: [kv for kv in kv_list if kv == section.heads or get_spec(e.name).supports_gqa]
             for e in entries}
    modes_of = {p: [m for m in modes if m != DECODE_MODE or p.causal] for p in patterns}

    def cell_at(entry, pattern: Pattern, length: int, mode: str, dtype: str, kv_heads: int) -> Cell:
        lk = max(1, round(length * section.kv_ratio)) if pattern.cross else length
        return Cell(kind="bench", attention=entry.name, pattern=pattern.value, hparams=dict(entry.hparams),
                    batch=section.batch, heads=section.heads, kv_heads=kv_heads, lq=length, lk=lk,
                    head_dim=section.head_dim, dtype=dtype, device=config.device, mode=mode, seed=config.seed,
                    label=entry.display_label, versions=versions_of(entry.name, entry.hparams),
                    options=dict(options))

    def cells() -> Iterator[Cell]:
        for entry, pattern, length in itertools.product(entries, patterns, lengths):
            for mode, dtype, kv_heads in itertools.product(modes_of[pattern], dtypes, kv_of[entry.name]):
                yield cell_at(entry, pattern, length, mode, dtype, kv_heads)

    size = sum(len(kv_of[e.name]) for e in entries) * len(lengths) * len(dtypes) * sum(
        len(m) for m in modes_of.values())
    if section.trials == 1:
        return size, cells()

    def shuffled() -> Iterator[Cell]:
        order = list(cells())
        random.Random(f"cab-trials-{config.seed}").shuffle(order)
        return iter(order)

    return size, _deferred(shuffled)


def _deferred(make: Callable[[], Iterator[Cell]]) -> Iterator[Cell]:
    """An iterator that builds its cells only when first advanced (the size check comes first)."""
    yield from make()


EXPANDERS: "Registry[Expander]" = Registry("section expander")
EXPANDERS.add("check", _check_cells)
EXPANDERS.add("bench", _bench_cells)


def register_section(name: str, model: "type[Section]", expander: Expander) -> None:
    """Add a cell section: configs accept a top-level key `name` validated by `model`, and `expand` lays
    it out with `expander(config, section) -> (count, cells)`. See the module docstring."""
    register_section_model(name, model)
    EXPANDERS.add(name, expander, f"module {getattr(expander, '__module__', '?')}")


def iter_cells(config: "Config | str | Path") -> "tuple[int, Iterator[Cell]]":
    """(number of cells, a lazy iterator over them) of a config or config file, sections in the order
    they were registered. Raises ConfigError above `max_cells` before building any cell."""
    if not isinstance(config, Config):
        config = load_config(config)
    missing = [name for name in config.sections() if name not in EXPANDERS]
    if missing:
        raise config.error(f"no expander is registered for section {missing[0]!r}", (missing[0],))
    expansions = {name: EXPANDERS.get(name)(config, section) for name, section in config.sections().items()}
    total = sum(size for size, _ in expansions.values())
    if total > config.max_cells:
        sizes = ", ".join(f"{name}: {size:,}" for name, (size, _) in expansions.items())
        raise config.error(
            f"the grid expands to {total:,} cells ({sizes}), over max_cells = {config.max_cells:,}; "
            "shrink the lists or raise max_cells", ("max_cells",) if "max_cells" in config.model_fields_set else ())
    return total, itertools.chain.from_iterable(cells for _, cells in expansions.values())


def expand(config: "Config | str | Path") -> "list[Cell]":
    """All cells of a config (or of a config file); the same config gives the same cells in the same order
    on every run and machine. Raises ConfigError above `max_cells`."""
    _, cells = iter_cells(config)
    return list(cells)


__all__ = ["EXPANDERS", "SECTIONS", "bench_options", "expand", "iter_cells", "register_section"]
