"""Resident memory of a process tree, read from Linux's /proc (no psutil): what an isolated cell holds.

Cheap enough to poll many times a second while a cell is being timed: it reads one small file per
process of the tree (usually one to three) and never scans all of /proc.
"""

from __future__ import annotations

import os
from pathlib import Path

PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_RSS_FIELD = 21  # index of `rss` (pages) among the fields after the command name in /proc/PID/stat


def available() -> bool:
    """True where /proc exposes per-process memory and children (Linux)."""
    return Path(f"/proc/{os.getpid()}/stat").is_file()


def _children(pid: int) -> "list[int]":
    children: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                children.extend(int(c) for c in f.read().split())
    except (OSError, ValueError):
        pass  # the process ended while we looked
    return children


def tree(pid: int) -> "list[int]":
    """`pid` and all its descendants that are alive now."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(_children(current))
    return found


def rss_bytes(pid: int) -> int:
    """Resident set size of one process in bytes (0 once it has exited)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return 0
    fields = stat[stat.rindex(b")") + 2:].split()
    return int(fields[_RSS_FIELD]) * PAGE_BYTES


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of `pid` and its descendants, in bytes (pages they share are counted per process,
    as the kernel's OOM accounting does for RSS)."""
    return sum(rss_bytes(p) for p in tree(pid))
