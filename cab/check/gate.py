"""`gate`: the cache of conformance verdicts that benchmarks and task cells consult before timing or training
anything, so no speed or accuracy is reported for a configuration whose correctness check failed.

A verdict has two parts: the fixed suite (cab.check.conformance, per attention, pattern, hyper-parameters,
device and dtype) and, when the caller names the shape it publishes, the shape probe at that shape
(cab.check.probe, per configuration and shape: what a kernel that dispatches on length, tile or head
dimension does at exactly the benchmarked size). The probe runs only when the suite passed; the report the
gate returns holds both, and its coverage names every shape, dtype and backend the verdict covers.

Verdicts are kept per process and, when the environment names a folder in CAB_GATE_DIR, shared through it
with the other processes of the same run (the pool and subprocess executors set it to a folder of their
own), so that a grid's workers check each configuration once rather than once per cell. Conformance is
seeded, so a verdict read from the folder is the one this process would compute."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

from cab.check.conformance import run_conformance, run_probe
from cab.check.outcomes import CheckOutcome, ConformanceReport
from cab.check.subject import Shape
from cab.patterns import Pattern
from cab.registry import versions_of
from cab.status import Status

GATE_DIR_ENV = "CAB_GATE_DIR"

_REPORTS: "dict[tuple, ConformanceReport]" = {}


def gate(attention: str, pattern: "Pattern | str", hparams: "dict | None", device: str, dtype: str,
         shape: "Shape | None" = None, decode: bool = False) -> ConformanceReport:
    """The conformance report of this configuration (seed 0), computed once per process or shared run; with
    `shape`, the suite's report combined with the probe of that shape (the probe only when the suite passed;
    `decode`: the probe of one decoding step at context shape.lk)."""
    suite = _suite(attention, pattern, hparams, device, dtype)
    if shape is None or suite.status is not Status.OK:
        return suite
    return suite.combined(_probe(attention, pattern, hparams, device, dtype, shape, decode))


def gate_published(attention: str, pattern: "Pattern | str", hparams: "dict | None", device: str, dtype: str,
                   shapes: "list[Shape]") -> ConformanceReport:
    """The suite's verdict with the probe of each of `shapes` appended, each named `published <shape>` (the
    probes only when the suite passed). Each probe is cached as gate(shape=...) caches it, so a check cell
    that runs them leaves them for the cells that publish those shapes: a grid's check cells, which may run
    side by side, probe what its benchmarks, which run alone, will time."""
    report = suite = _suite(attention, pattern, hparams, device, dtype)
    for shape in shapes if suite.status is Status.OK else []:
        probe = _probe(attention, pattern, hparams, device, dtype, shape, False)
        named = [CheckOutcome(f"{c.name} {shape.describe()}", c.status, c.error, c.tolerance, c.message, c.kind)
                 for c in probe.checks]
        report = report.combined(dataclasses.replace(probe, checks=named))
    return report


def _key(attention: str, pattern: "Pattern | str", hparams: "dict | None", device: str, dtype: str) -> tuple:
    return (attention, json.dumps(versions_of(attention, hparams), sort_keys=True), Pattern.parse(pattern).value,
            json.dumps(hparams or {}, sort_keys=True, default=repr), device, dtype)


def _suite(attention: str, pattern: "Pattern | str", hparams: "dict | None", device: str, dtype: str,
           ) -> ConformanceReport:
    return _cached(_key(attention, pattern, hparams, device, dtype),
                   lambda: run_conformance(attention, pattern, hparams=hparams, device=device, dtype=dtype, seed=0))


def _probe(attention: str, pattern: "Pattern | str", hparams: "dict | None", device: str, dtype: str, shape: Shape,
           decode: bool) -> ConformanceReport:
    size = (shape.batch, shape.heads, shape.kv_heads, shape.lq, shape.lk, shape.head_dim, decode)
    return _cached(_key(attention, pattern, hparams, device, dtype) + size,
                   lambda: run_probe(attention, pattern, shape, hparams=hparams, device=device, dtype=dtype,
                                     decode=decode))


def published_shape(batch: int, heads: int, kv_heads: int, lq: int, lk: int, head_dim: int) -> Shape:
    """The Shape a cell publishes (the probe's input sizes)."""
    return Shape(batch, heads, kv_heads, lq, lk, head_dim, "published")


def _cached(key: tuple, compute) -> ConformanceReport:
    if key not in _REPORTS:
        path = _shared_path(key)
        report = _read(path) if path is not None else None
        if report is None:
            report = compute()
            if path is not None:
                _write(path, report)
        _REPORTS[key] = report
    return _REPORTS[key]


def _shared_path(key: tuple) -> "Path | None":
    folder = os.environ.get(GATE_DIR_ENV)
    if not folder:
        return None
    return Path(folder) / (hashlib.sha256(json.dumps(key).encode()).hexdigest() + ".json")


def _read(path: Path) -> "ConformanceReport | None":
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # not there yet (or being written): compute it here
    checks = [CheckOutcome.from_dict(c) for c in data["checks"]]
    return ConformanceReport(data["attention"], Pattern.parse(data["pattern"]), checks, data["hparams"],
                             data["device"], data["dtype"], data.get("coverage") or {})


def _write(path: Path, report: ConformanceReport) -> None:
    """Write atomically (temporary file + rename): a reader sees the whole verdict or none."""
    data = {"attention": report.attention, "pattern": report.pattern.value, "hparams": report.hparams,
            "device": report.device, "dtype": report.dtype, **report.to_metrics()}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(data, default=repr))
    os.replace(partial, path)
