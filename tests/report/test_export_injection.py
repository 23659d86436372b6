"""Exports carry no injections (issue 21, item 10): text cells a spreadsheet would run as formulas get a
leading single quote in tables/*.csv and `cab export --format csv` (numbers stay numbers), and Markdown
cells carry no raw HTML."""

from __future__ import annotations

import csv
import io

import pandas as pd

from cab.cells import Cell, Result
from cab.cli import main
from cab.report.export import to_csv, to_markdown
from cab.status import Status
from cab.store import ResultStore

FORMULAS = ["=HYPERLINK(\"http://x\")", "+1+1", "-2+3", "@SUM(A1)", "\tTAB", "\rCR"]


def test_report_csv_neutralises_formulas_but_keeps_numbers():
    frame = pd.DataFrame({"label": FORMULAS + ["plain"], "value": [-1.5, 2, -3, 4.25, 0, -0.5, 7]})
    rows = list(csv.reader(io.StringIO(to_csv(frame), newline="")))[1:]
    assert [r[0] for r in rows] == ["'" + f for f in FORMULAS] + ["plain"]
    assert [r[1] for r in rows] == ["-1.5", "2", "-3", "4.25", "0", "-0.5", "7"]


def test_markdown_escapes_html_and_pipes():
    md = to_markdown(pd.DataFrame({"name": ["<script>alert(1)</script>", "<img src=x onerror=alert(1)>|x"]}),
                     "<b>title</b>")
    assert "<script>" not in md and "<img" not in md and "<b>" not in md
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in md and "\\|x" in md


def test_cab_export_csv_neutralises_text_cells(tmp_path, capsys):
    db = tmp_path / "cab.sqlite"
    with ResultStore(db) as store:
        for i, label in enumerate(FORMULAS[:4]):
            cell = Cell(kind="bench", attention="vanilla", pattern="NS", lq=8 + i, lk=8 + i, mode="fwd", label=label)
            store.put(Result(cell, Status.OK, metrics={"median_ms": -1.0 * i, "note": "=1+1"}, message="-bad"))
    out = tmp_path / "x.csv"
    assert main(["export", "--format", "csv", "--db", str(db), "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert sorted(r["label"] for r in rows) == sorted("'" + f for f in FORMULAS[:4])
    assert {r["message"] for r in rows} == {"'-bad"} and {r["m_note"] for r in rows} == {"'=1+1"}
    assert sorted(float(r["m_median_ms"]) for r in rows) == [-3.0, -2.0, -1.0, 0.0]  # numbers stay numbers
    assert not any(v.startswith(("=", "+", "@")) for r in rows for v in r.values())
