"""Built-in attentions: one module per family. Every module in this package (except the helpers named
in `_NOT_MECHANISMS`) is imported on first use of the registry, so adding an attention touches one file."""

from __future__ import annotations

import importlib
import pkgutil

_NOT_MECHANISMS = {"base", "functional"}


def load_builtin_attentions() -> None:
    """Import every mechanism module of this package, which registers its attentions."""
    for info in pkgutil.iter_modules(__path__):
        if info.name not in _NOT_MECHANISMS and not info.name.startswith("_") and not info.ispkg:
            importlib.import_module(f"{__name__}.{info.name}")
