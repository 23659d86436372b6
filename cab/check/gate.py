"""`gate`: the per-process cache of conformance verdicts that benchmarks consult before timing anything,
so no speed is reported for a configuration whose correctness check failed."""

from __future__ import annotations

import json

from cab.check.conformance import run_conformance
from cab.check.outcomes import ConformanceReport
from cab.patterns import Pattern

_REPORTS: "dict[tuple, ConformanceReport]" = {}


def gate(attention: str, pattern: "Pattern | str", hparams: "dict | None", device: str, dtype: str,
         ) -> ConformanceReport:
    """The conformance report of this configuration (seed 0), computed once per process."""
    key = (attention, Pattern.parse(pattern).value, json.dumps(hparams or {}, sort_keys=True, default=repr),
           device, dtype)
    if key not in _REPORTS:
        _REPORTS[key] = run_conformance(attention, pattern, hparams=hparams, device=device, dtype=dtype, seed=0)
    return _REPORTS[key]
