"""Defensive readers of the cell fields of result rows (a partial or older store may hold NULLs, NaNs or odd
types) and of the values nested in them, and display helpers. A result's metrics are read once, through their
schema (cab.metrics), by cab.tables: no section reads a metrics dict of its own."""

from __future__ import annotations

import json
import math
import re
from typing import Any, Mapping

import pandas as pd

from cab.metrics import as_integer, as_number
from cab.status import Status

STATUS_ORDER = tuple(s.value for s in Status)


def text(value: Any) -> str:
    """A field as display text: '' for NULL/NaN, the string otherwise."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def is_missing(value: Any) -> bool:
    """True for None and for scalar NaN/NaT/NA (pandas' notion); lists, tuples and dicts are present."""
    if value is None:
        return True
    if isinstance(value, (list, tuple, dict)):
        return False
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def number(value: Any) -> "float | None":
    """A finite float, or None for anything missing, non-numeric, boolean or non-finite (cab.metrics.as_number,
    as a float)."""
    result = as_number(value)
    return None if result is None else float(result)


def integer(value: Any) -> "int | None":
    """An integral field (pandas turns INTEGER columns with NULLs into floats)."""
    return as_integer(value)


def mapping(value: Any) -> dict:
    """A dict field (hparams, provenance, task_params), {} when missing or not a dict."""
    return dict(value) if isinstance(value, Mapping) else {}


def status(value: Any) -> str:
    """The status text of a row or check, lower-cased; 'unknown' when missing."""
    return text(value).strip().lower() or "unknown"


def label(row: Mapping) -> str:
    """How a row's attention is displayed: its label, else its attention name."""
    return text(row.get("label")) or text(row.get("attention")) or "(unnamed)"


def compact_json(value: Any) -> str:
    """Short, stable JSON for hyper-parameters and options ('' for an empty dict)."""
    if not value:
        return ""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def shape(row: Mapping) -> str:
    """'Lq' when the lengths agree, 'Lq×Lk' otherwise ('?' for a missing length)."""
    lq, lk = integer(row.get("lq")), integer(row.get("lk"))
    if lq is not None and lq == lk:
        return str(lq)
    return f"{'?' if lq is None else lq}×{'?' if lk is None else lk}"


def slug(value: Any) -> str:
    """`value` reduced to characters safe in an element id and a URL fragment."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text(value)).strip("-") or "x"


def anchor(key: Any) -> str:
    """Element id of a result in the failures list (keys are hex, but a foreign store may differ)."""
    return "fail-" + slug(key)
