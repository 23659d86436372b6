"""Status values of a cell result: every outcome is a status, never a crash of cab."""

from __future__ import annotations

from enum import Enum


class Status(str, Enum):
    """Outcome of one check, one cell or one conformance verdict."""

    OK = "ok"
    UNSUPPORTED = "unsupported"  # the attention does not declare this pattern / configuration
    INCORRECT = "incorrect"  # ran, but a correctness check failed (which one is in the message)
    ERROR = "error"  # raised an exception (the text is in the message)
    TIMEOUT = "timeout"  # exceeded its time limit
    OOM = "oom"  # ran out of memory
    SKIPPED = "skipped"  # deliberately not run (e.g. estimated memory above the limit)

    def __str__(self) -> str:
        return self.value

    @property
    def severity(self) -> int:
        """Rank used to combine statuses: the worst one wins."""
        return _SEVERITY[self]

    @staticmethod
    def worst(statuses: "list[Status] | tuple[Status, ...]") -> "Status":
        """The most severe of several statuses (OK for an empty list)."""
        return max(statuses, key=lambda s: s.severity, default=Status.OK)


_SEVERITY = {
    Status.OK: 0,
    Status.SKIPPED: 1,
    Status.UNSUPPORTED: 2,
    Status.INCORRECT: 5,
    Status.TIMEOUT: 4,
    Status.OOM: 4,
    Status.ERROR: 6,
}
