"""Every table of the report also as CSV and Markdown, in `tables/` beside index.html (for papers and
READMEs). A missing value is an empty CSV field and '—' in Markdown, never 0."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from cab.report.fields import is_missing, slug

TABLES_DIR = "tables"


@dataclass(frozen=True)
class Exported:
    id: str
    title: str
    csv: str  # paths relative to index.html
    markdown: str
    rows: int


def _cell(value) -> str:
    if is_missing(value):
        return ""
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    return str(value)


def to_csv(frame: pd.DataFrame) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([str(c) for c in frame.columns])
    for row in frame.itertuples(index=False):
        writer.writerow([_cell(v) for v in row])
    return buffer.getvalue()


def _md(value) -> str:
    if is_missing(value):
        return "—"
    if isinstance(value, float):
        value = f"{value:.4g}"
    return " ".join(str(value).split()).replace("\\", "\\\\").replace("|", "\\|") or " "


def to_markdown(frame: pd.DataFrame, title: str = "") -> str:
    header = [_md(c) for c in frame.columns]
    lines = [f"**{_md(title)}**", ""] if title else []
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(_md(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def write_exports(out: Path, tables: "list[tuple[str, str, pd.DataFrame]]") -> "dict[str, Exported]":
    """Write each (id, title, frame) as tables/<id>.csv and tables/<id>.md; returns id -> Exported."""
    folder = out / TABLES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    written, taken = {}, set()
    for table_id, title, frame in tables:
        name = slug(table_id)
        while name in taken:
            name += "-x"
        taken.add(name)
        (folder / f"{name}.csv").write_text(to_csv(frame), encoding="utf-8")
        (folder / f"{name}.md").write_text(to_markdown(frame, title), encoding="utf-8")
        written[table_id] = Exported(table_id, title, f"{TABLES_DIR}/{name}.csv", f"{TABLES_DIR}/{name}.md", len(frame))
    return written
