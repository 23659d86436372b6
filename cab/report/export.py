"""Every table of the report also as CSV and Markdown, in `tables/` beside index.html (for papers and
READMEs). A missing value is an empty CSV field and '—' in Markdown, never 0.

The strings in them come from plugins and configs: a CSV text cell that a spreadsheet would read as a
formula (it starts with =, +, -, @, a tab or a carriage return) gets a leading single quote (OWASP's CSV
injection advice; numbers stay numbers), and Markdown cells have HTML escaped (a Markdown viewer renders
raw HTML) and `|` escaped. Every file is written to a temporary file in the same folder and renamed, so a
full disk leaves the previous file, never an empty or half one."""

from __future__ import annotations

import csv
import html
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from cab.report.fields import is_missing, slug
from cab.report.load import ReportError

TABLES_DIR = "tables"


@dataclass(frozen=True)
class Exported:
    id: str
    title: str
    csv: str  # paths relative to index.html
    markdown: str
    rows: int


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_text(value: str) -> str:
    """A text cell a spreadsheet shows as text: one starting like a formula gets a leading single quote."""
    return "'" + value if value.startswith(FORMULA_START) else value


def _cell(value) -> str:
    if is_missing(value):
        return ""
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    if isinstance(value, (int, bool)) or hasattr(value, "dtype"):  # numbers (numpy's too) stay numbers
        return str(value)
    return csv_text(str(value))


def write_atomically(path: Path, write) -> None:
    """Call `write(temporary path)` and rename the result over `path` (same folder, so the rename is atomic).
    A failed write (a full disk) leaves `path` as it was and no temporary file, and is a ReportError."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise ReportError(f"could not write {path} ({exc.strerror or exc}); it is unchanged: free disk space or "
                          "choose another output path") from None
    finally:
        tmp.unlink(missing_ok=True)


def to_csv(frame: pd.DataFrame) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")  # RFC 4180; a CR inside a field is then quoted too
    writer.writerow([str(c) for c in frame.columns])
    for row in frame.itertuples(index=False):
        writer.writerow([_cell(v) for v in row])
    return buffer.getvalue()


def _md(value) -> str:
    if is_missing(value):
        return "—"
    if isinstance(value, float):
        value = f"{value:.4g}"
    text = html.escape(" ".join(str(value).split()), quote=False)  # no raw HTML reaches a Markdown viewer
    return text.replace("\\", "\\\\").replace("|", "\\|") or " "


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
        csv_text_, markdown = to_csv(frame), to_markdown(frame, title)
        write_atomically(folder / f"{name}.csv", lambda tmp: tmp.write_text(csv_text_, encoding="utf-8"))
        write_atomically(folder / f"{name}.md", lambda tmp: tmp.write_text(markdown, encoding="utf-8"))
        written[table_id] = Exported(table_id, title, f"{TABLES_DIR}/{name}.csv", f"{TABLES_DIR}/{name}.md", len(frame))
    return written
