"""A page per attention (its metadata and citation, hyper-parameters, support, and every result for it),
and the file names of those pages: safe for any attention name (a slug of the name for readability plus
a hash of the exact name, so two names that slug alike never share a page and nothing escapes the folder)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import pandas as pd

from cab.report.fields import anchor, compact_json, integer, label, mapping, number, shape, slug, status, text
from cab.status import Status
from cab.tables import RECORD

PAGES_DIR = "attention"


def page_file(name: str) -> str:
    """'attention/<slug>-<hash>.html', relative to index.html."""
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{PAGES_DIR}/{slug(name)[:48]}-{digest}.html"


@dataclass(frozen=True)
class ResultLine:
    kind: str
    task: str
    pattern: str
    mode: str
    shape: str
    dtype: str
    device: str
    seed: str
    label: str
    status: str
    headline: str
    message: str
    link: str  # anchor in index.html of a failed result ('' when none)


@dataclass(frozen=True)
class AttentionPage:
    name: str
    file: str
    registered: bool
    metadata: tuple  # (key, value) pairs
    hparams: tuple  # (name, default) pairs
    unsupported: tuple  # (pattern, reason) pairs
    support: object  # SupportRow or None
    scores: pd.DataFrame  # task summary rows of this attention's labels
    lengths: pd.DataFrame
    exponents: pd.DataFrame
    results: tuple


def _headline(row: dict) -> str:
    """A row of the typed results table in a few words: time, memory, state and sparsity of a benchmark, the
    checks passed, the first scalar metrics of any other kind."""
    kind = text(row.get("kind"))
    if status(row.get("status")) != Status.OK.value:
        return ""
    if kind == "bench":
        parts = []
        if row.get("median_ms") is not None:
            parts.append(f"{row['median_ms']:.4g} ms")
        if row.get("peak_mem_bytes") is not None:
            parts.append(f"{row['peak_mem_bytes'] / 2 ** 20:.3g} MiB")
        if row.get("state_bytes") is not None:
            parts.append(f"state {row['state_bytes']} B")
        if row.get("achieved_sparsity") is not None:
            parts.append(f"sparsity {row['achieved_sparsity']:.3g}")
        return ", ".join(parts)
    if kind == "check":
        checks = row.get("checks")
        return f"{len(checks)} checks passed" if isinstance(checks, list) else ""
    metrics = row[RECORD].to_dict() if row.get(RECORD) is not None else {}
    scalars = [f"{k}={number(v):.4g}" for k, v in metrics.items()
               if number(v) is not None and k not in ("steps", "train_s", "eval_s", "param_overhead", "final_loss")
               and not k.startswith("params_") and not isinstance(v, bool)]
    return ", ".join(scalars[:4])


def _line(row: dict) -> ResultLine:
    value = status(row.get("status"))
    failed = value not in (Status.OK.value, Status.UNSUPPORTED.value)
    message = (text(row.get("message")).strip().splitlines() or [""])[0]
    return ResultLine(
        kind=text(row.get("kind")), task=text(row.get("task")), pattern=text(row.get("pattern")),
        mode=text(row.get("mode")), shape=shape(row), dtype=text(row.get("dtype")), device=text(row.get("device")),
        seed=text(integer(row.get("seed"))), label=label(row), status=value, headline=_headline(row),
        message=message[:300], link=anchor(row.get("key")) if failed else "",
    )


def attention_pages(results: pd.DataFrame, support: list, summary: "pd.DataFrame | None",
                    lengths: pd.DataFrame, exponents: pd.DataFrame) -> "list[AttentionPage]":
    """One page model per attention found in the typed results table (cab.tables)."""
    from cab import registry

    registered = set(registry.names())
    by_name = {row.attention: row for row in support}
    names = sorted({text(a) for a in results["attention"]}, key=str.casefold)
    pages = []
    records = results.to_dict("records")
    for name in names:
        mine = [r for r in records if text(r.get("attention")) == name]
        labels = {label(r) for r in mine}
        metadata, hparams, unsupported = [], [], []
        if name in registered:
            spec = registry.get_spec(name)
            metadata = [("family", spec.family), ("exact", "exact" if spec.exact else "approximate"),
                        ("declared patterns", " ".join(p.value for p in spec.patterns)),
                        ("mechanism (seed catalogue)", spec.mechanism or "—"), ("citation", spec.citation),
                        ("grouped-query attention", "yes" if spec.supports_gqa else "no"),
                        ("naive reference()", "yes" if spec.has_reference else "no"), ("source", spec.source)]
            if spec.description:
                metadata.append(("description", spec.description))
            hparams = [(k, v if isinstance(v, str) else json.dumps(v, default=str)) for k, v in spec.hparams.items()]
            unsupported = [(p.value, r) for p, r in spec.unsupported_reasons.items()]
        hp_used = sorted({compact_json(mapping(r.get("hparams"))) for r in mine} - {""})
        if hp_used:
            metadata.append(("hyper-parameters in these results", "; ".join(hp_used)))
        scores = summary[summary["attention"].isin(labels)] if summary is not None and not summary.empty else \
            pd.DataFrame()
        lines = sorted(map(_line, mine),
                       key=lambda line: (line.kind, line.task, line.pattern, line.mode, line.shape, line.seed))
        pages.append(AttentionPage(
            name=name, file=page_file(name), registered=name in registered, metadata=tuple(metadata),
            hparams=tuple(hparams), unsupported=tuple(unsupported), support=by_name.get(name),
            scores=scores, lengths=lengths[lengths["attention"].isin(labels)] if not lengths.empty else lengths,
            exponents=exponents[exponents["attention"].isin(labels)] if not exponents.empty else exponents,
            results=tuple(lines),
        ))
    return pages
