"""One small generic registry: names to things, with the source that registered each, lazy loading of the
modules that register them, duplicate refusal and near-match suggestions for unknown names.

cab keeps five: attentions (`cab.registry`), tasks (`cab.tasks`), config sections (`cab.grid`), executors
(`cab.executors`) and cell kinds (`cab.kinds`). Each loads its built-ins on first lookup and, where it has
one, the entry-point group through which installed packages add theirs."""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


def import_file(module_name: str, path: "str | Path", package_dirs: "list[str] | None" = None) -> ModuleType:
    """Import the file `path` as the module `module_name` (a package searching `package_dirs` when given):
    how plugin files and the task folder are loaded. A module that fails to import leaves no trace."""
    spec = importlib.util.spec_from_file_location(module_name, path, submodule_search_locations=package_dirs)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module


class UnknownName(LookupError):
    """A name nobody registered; the message suggests near matches."""

    def __init__(self, what: str, name: str, known: "list[str]", hint: str = ""):
        self.what, self.name, self.known = what, name, known
        near = difflib.get_close_matches(str(name), known, n=3, cutoff=0.5)
        suggestion = f"; did you mean {', '.join(repr(n) for n in near)}?" if near else ""
        where = hint or f"known: {', '.join(known) or 'none'}"
        super().__init__(f"unknown {what} {name!r}{suggestion} ({where})")

    def __str__(self) -> str:  # LookupError would quote the message
        return self.args[0]


class DuplicateName(ValueError):
    """Two sources registered the same name."""


class Registry(Generic[T]):
    """Names -> registered things of one kind (`what`, used in messages).

    `modules` are imported and `entry_points` (a group name) loaded on the first lookup, so that the
    things they register are there; `loader` is called too where loading is more than an import.
    `unknown(name, known)` and `duplicate(message)` build the errors (subclasses of UnknownName and
    DuplicateName that callers catch by their own names)."""

    def __init__(self, what: str, *, modules: "tuple[str, ...]" = (), entry_points: str = "",
                 loader: "Callable[[], None] | None" = None,
                 unknown: "Callable[[str, list[str]], UnknownName] | None" = None,
                 duplicate: "type[DuplicateName]" = DuplicateName):
        self.what, self.modules, self.entry_points = what, modules, entry_points
        self._loader, self._duplicate = loader, duplicate
        self._unknown = unknown or (lambda name, known: UnknownName(what, name, known))
        self._items: dict[str, T] = {}
        self._sources: dict[str, str] = {}
        self._loaded = False

    def add(self, name: str, item: T, source: str = "") -> T:
        """Register `item` under `name`; the same item again is a no-op, another one is a DuplicateName."""
        prior = self._items.get(name)
        if prior is item:
            return item
        if prior is not None:
            raise self._duplicate(f"{self.what} {name!r} is registered twice: by {self._sources[name] or 'cab'} and by "
                                f"{source or 'cab'}; rename one of them")
        self._items[name], self._sources[name] = item, source
        return item

    def peek(self, name: str) -> "T | None":
        """The thing registered under `name` so far, without loading anything (None if there is none)."""
        return self._items.get(name)

    def copy(self) -> "Registry[T]":
        """A loaded registry with the same entries, to register into and throw away (tests)."""
        self.load()
        other: Registry[T] = Registry(self.what, unknown=self._unknown, duplicate=self._duplicate)
        other._items, other._sources, other._loaded = dict(self._items), dict(self._sources), True
        return other

    def remove(self, name: str) -> None:
        """Forget `name` (tests and interactive sessions)."""
        self._items.pop(name, None)
        self._sources.pop(name, None)

    def load(self) -> None:
        """Import the modules that register this registry's built-ins and installed entries (once)."""
        if self._loaded:
            return
        self._loaded = True
        for module in self.modules:
            importlib.import_module(module)
        if self._loader is not None:
            self._loader()
        if self.entry_points:
            for entry_point in importlib.metadata.entry_points(group=self.entry_points):
                entry_point.load()

    def get(self, name: str) -> T:
        """The thing registered under `name`; raises UnknownName with near-match suggestions."""
        if name not in self._items:
            self.load()
        try:
            return self._items[name]
        except KeyError:
            raise self._unknown(name, self.names()) from None

    def source(self, name: str) -> str:
        """Who registered `name` (a module, a plugin file, an entry point)."""
        self.get(name)
        return self._sources[name]

    def names(self) -> "list[str]":
        """Every registered name, sorted."""
        self.load()
        return sorted(self._items)

    def items(self) -> "list[tuple[str, T]]":
        """(name, thing) in name order."""
        return [(name, self._items[name]) for name in self.names()]

    def ordered(self) -> "list[tuple[str, T]]":
        """(name, thing) in registration order (what sections and cell kinds expand in)."""
        self.load()
        return list(self._items.items())

    def __contains__(self, name: object) -> bool:
        self.load()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        self.load()
        return len(self._items)
