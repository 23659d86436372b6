"""Output paths checked before any work runs: a file or folder that cab is about to create or write."""

from __future__ import annotations

import os
from pathlib import Path


def creation_problem(folder: Path, path: Path, option: str) -> "str | None":
    """Why `path` (whose folder is `folder`, itself or its parent) cannot be created or written: its nearest
    existing ancestor is a file, or a folder this process may not write into; None when it can be."""
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        return f"{option} {path} cannot be created: {existing} is a file, not a folder; choose another {option}"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{option} {path} cannot be written: the folder {existing} is not writable; choose another {option}"
    return None
