"""The results of conformance: one `CheckOutcome` per check, gathered into a `ConformanceReport`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from cab.patterns import Pattern
from cab.status import Status


@dataclass(frozen=True)
class CheckOutcome:
    """One named check: its status, the error it measured and the tolerance that error was held to.

    `error` is what the check measured: a relative deviation for the structural and reference comparisons,
    a max-abs error for exact_oracle, the fraction of non-finite values for finite and backward; None for
    checks that measure nothing (forward, shape_dtype, undeclared_pattern) or that raised."""

    name: str
    status: Status
    error: "float | None" = None
    tolerance: "float | None" = None
    message: str = ""

    def to_dict(self) -> dict:
        """JSON-ready form (a non-finite error, from NaN or inf outputs, becomes None; the message says so)."""
        return {
            "name": self.name, "status": self.status.value, "error": _finite_or_none(self.error),
            "tolerance": _finite_or_none(self.tolerance), "message": self.message,
        }


def _finite_or_none(value: "float | None") -> "float | None":
    return float(value) if value is not None and math.isfinite(value) else None


Finding = tuple[float, str]  # (measured error, where it was measured)


def measured(name: str, error: float, tolerance: float, detail: str, note: str = "") -> CheckOutcome:
    """An outcome from a measured error: ok when error <= tolerance (a NaN error fails), else incorrect."""
    passed = error <= tolerance  # False for NaN
    verb = "<=" if passed else ">"
    shown = f"{error:.2e}" if math.isfinite(error) else "non-finite (NaN/inf values)"
    message = f"{detail}: error {shown} {verb} tolerance {tolerance:.2e}"
    if note:
        message += f"; {note}"
    return CheckOutcome(name, Status.OK if passed else Status.INCORRECT, error, tolerance, message)


def judged(name: str, found: "list[Finding]", tolerance: float, context: str, note: str = "") -> CheckOutcome:
    """The outcome of the worst of several measurements held to one tolerance."""
    error, where = max(found, key=lambda f: f[0])
    return measured(name, error, tolerance, f"worst: {where} ({context})", note)


@dataclass(frozen=True)
class ConformanceReport:
    """The verdict of one attention on one pattern: the worst status of its checks, and the checks."""

    attention: str
    pattern: Pattern
    checks: "list[CheckOutcome]"
    hparams: dict = field(default_factory=dict)
    device: str = "cpu"
    dtype: str = "float32"

    @property
    def status(self) -> Status:
        return Status.worst([c.status for c in self.checks])

    @property
    def deciding_check(self) -> "CheckOutcome | None":
        """The first check whose status is the verdict (None when every check passed)."""
        verdict = self.status
        if verdict is Status.OK:
            return None
        return next(c for c in self.checks if c.status is verdict)

    @property
    def message(self) -> str:
        """One line: the check that decided the verdict and what it measured, or the unsupported reason."""
        check = self.deciding_check
        if check is None:
            return f"all {len(self.checks)} checks passed"
        text = check.message if check.status is Status.UNSUPPORTED else f"{check.name}: {check.message}"
        return " ".join(text.split())

    def to_metrics(self) -> dict:
        """JSON-ready: {"verdict": status, "checks": [each check's dict]}."""
        return {"verdict": self.status.value, "checks": [c.to_dict() for c in self.checks]}
