"""The results of conformance: one `CheckOutcome` per check, gathered into a `ConformanceReport`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from cab.metrics import CheckMetrics
from cab.patterns import Pattern
from cab.status import Status


@dataclass(frozen=True)
class CheckOutcome:
    """One named check: its status, the error it measured and the tolerance that error was held to.

    `error` is what the check measured and `kind` says what sort of number it is: "relative" (a deviation
    over the scale of the expected tensor: the structural and reference comparisons), "absolute" (a max-abs
    error: exact_oracle), "fraction" (of non-finite values: finite, backward); None for checks that measure
    nothing (forward, shape_dtype, undeclared_pattern) or that raised."""

    name: str
    status: Status
    error: "float | None" = None
    tolerance: "float | None" = None
    message: str = ""
    kind: str = "relative"

    def to_dict(self) -> dict:
        """JSON-ready form (a non-finite error, from NaN or inf outputs, becomes None; the message says so)."""
        return {
            "name": self.name, "status": self.status.value, "error": _finite_or_none(self.error),
            "tolerance": _finite_or_none(self.tolerance), "kind": self.kind, "message": self.message,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "CheckOutcome":
        return cls(data["name"], Status(data["status"]), data.get("error"), data.get("tolerance"),
                   data.get("message", ""), data.get("kind", "relative"))


def _finite_or_none(value: "float | None") -> "float | None":
    return float(value) if value is not None and math.isfinite(value) else None


Finding = tuple[float, str]  # (measured error, where it was measured)


def measured(name: str, error: float, tolerance: float, detail: str, note: str = "",
             kind: str = "relative") -> CheckOutcome:
    """An outcome from a measured error: ok when error <= tolerance (a NaN error fails), else incorrect."""
    passed = error <= tolerance  # False for NaN
    verb = "<=" if passed else ">"
    shown = f"{error:.2e}" if math.isfinite(error) else "non-finite (NaN/inf values)"
    message = f"{detail}: {kind} error {shown} {verb} tolerance {tolerance:.2e}"
    if note:
        message += f"; {note}"
    return CheckOutcome(name, Status.OK if passed else Status.INCORRECT, error, tolerance, message, kind)


def judged(name: str, found: "list[Finding]", tolerance: float, context: str, note: str = "",
           kind: str = "relative") -> CheckOutcome:
    """The outcome of the worst of several measurements held to one tolerance."""
    error, where = max(found, key=lambda f: f[0] if f[0] == f[0] else math.inf)  # NaN counts as worst
    return measured(name, error, tolerance, f"worst: {where} ({context})", note, kind)


@dataclass(frozen=True)
class ConformanceReport:
    """The verdict of one attention on one pattern: the worst status of its checks, the checks, and what the
    verdict covers (`coverage`: the shapes, dtypes and backends checked, the structural dtype and any
    fallback from float64, the checks that could not run and why, and the seconds the checks took)."""

    attention: str
    pattern: Pattern
    checks: "list[CheckOutcome]"
    hparams: dict = field(default_factory=dict)
    device: str = "cpu"
    dtype: str = "float32"
    coverage: dict = field(default_factory=dict)

    @property
    def status(self) -> Status:
        return Status.worst([c.status for c in self.checks])

    @property
    def failing(self) -> "list[CheckOutcome]":
        """Every check that did not pass (skipped ones included), in order."""
        return [c for c in self.checks if c.status is not Status.OK]

    @property
    def deciding_check(self) -> "CheckOutcome | None":
        """The first check whose status is the verdict (None when every check passed)."""
        verdict = self.status
        if verdict is Status.OK:
            return None
        return next(c for c in self.checks if c.status is verdict)

    @property
    def message(self) -> str:
        """One line: the check that decided the verdict and what it measured (and how many other checks
        failed), or the unsupported reason."""
        check = self.deciding_check
        if check is None:
            return f"all {len(self.checks)} checks passed"
        text = check.message if check.status is Status.UNSUPPORTED else f"{check.name}: {check.message}"
        others = [c.name for c in self.checks if c.status in (Status.INCORRECT, Status.ERROR, Status.OOM,
                                                               Status.TIMEOUT) and c is not check]
        if others:
            text += f" (also failing: {', '.join(others)})"
        return " ".join(text.split())

    def to_metrics(self) -> dict:
        """JSON-ready CheckMetrics: {"verdict": status, "checks": [each check's dict], "coverage": {...}}."""
        return CheckMetrics(verdict=self.status.value, checks=[c.to_dict() for c in self.checks],
                            coverage=self.coverage).to_dict()

    def combined(self, other: "ConformanceReport") -> "ConformanceReport":
        """This report with `other`'s checks appended and coverages merged (the gate adds the probe of a
        published shape to the suite's verdict)."""
        coverage = dict(self.coverage)
        for key, value in other.coverage.items():
            if isinstance(value, list):
                coverage[key] = list(coverage.get(key, [])) + [v for v in value if v not in coverage.get(key, [])]
            elif isinstance(value, dict):
                coverage[key] = {**coverage.get(key, {}), **value}
            elif isinstance(value, (int, float)) and isinstance(coverage.get(key), (int, float)):
                coverage[key] = coverage[key] + value
            else:
                coverage.setdefault(key, value)
        return ConformanceReport(self.attention, self.pattern, self.checks + other.checks, self.hparams,
                                 self.device, self.dtype, coverage)

