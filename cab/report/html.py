"""Renders the leaderboard page model to one self-contained HTML file (CSS and JS inlined, no network).

Every value from the store, the registry or a plugin goes through jinja2 with autoescape on. The page
is the sections below in order, each a template `_<name>.html.j2`: a new section (plots, accuracy)
is one template and one entry here plus what it needs in the page model.
"""

from __future__ import annotations

import functools
import os
from importlib import resources
from pathlib import Path

import jinja2
import pandas as pd
from markupsafe import Markup

import cab
from cab.report.aggregate import Page, build_page
from cab.report.export import write_exports
from cab.report.fidelity import DEFAULT_BUDGET_S, SHAPE_TEXT
from cab.report.fields import is_missing, slug
from cab.report.load import read_tables
from cab.report.pages import PAGES_DIR
from cab.report.rankings import TOP
from cab.report.support import PATTERNS, registry_declarations

SECTIONS = (
    ("overview", "Overview"),
    ("rankings", "Rankings"),
    ("leaderboards", "Leaderboards"),
    ("support", "Pattern support"),
    ("efficiency", "Efficiency"),
    ("analyses", "Extrapolation & consistency"),
    ("fidelity", "Fidelity"),
    ("catalog", "Catalogue"),
    ("failures", "Failures"),
)
# a page per pattern (PATTERN_DIR/<pattern>.html): its whole ranking, efficiency tables, plots and analyses
PATTERN_DIR = "pattern"
PATTERN_SECTIONS = (("pattern_ranking", "ranking"), ("pattern_efficiency", "Efficiency"),
                    ("pattern_fidelity", "Fidelity"))
CATALOG_FILE = "catalog.html"


def pattern_file(pattern: str) -> str:
    """'pattern/NS.html', relative to index.html."""
    return f"{PATTERN_DIR}/{slug(pattern)}.html"


def by_pattern(frame: "pd.DataFrame | None", pattern: str) -> "pd.DataFrame | None":
    """The rows of an analysis frame for one pattern (its `pattern` column, or its configuration's first part)."""
    if frame is None or frame.empty:
        return frame
    if "pattern" in frame:
        return frame[frame["pattern"] == pattern]
    if "configuration" in frame:
        return frame[frame["configuration"].astype(str).str.startswith(f"{pattern} · ")]
    return frame


def ordered_rows(table) -> list:
    """An efficiency table's rows in ranking order: fastest at the ranking's length first, the rest by name."""
    from cab.report.rankings import ranking_column

    if not table.columns:
        return list(table.rows)
    col = ranking_column(table)

    def key(row):
        cell = row.cells[col]
        timed = cell.state == "ok" and cell.median_ms is not None
        return (not timed, cell.median_ms if timed else 0.0, row.name.casefold())

    return sorted(table.rows, key=key)


def figure(value: "float | None", digits: int = 3) -> str:
    """A number with `digits` significant figures, without exponent for values up to 10**digits; '—' for None."""
    if value is None:
        return "—"
    if abs(value) >= 10 ** digits:
        return f"{value:.0f}"
    return f"{value:.{digits}g}"


def signed(value: "float | None", digits: int = 3) -> str:
    """'+0.123' / '-1.5' ('—' for None)."""
    if value is None:
        return "—"
    return f"{value:+.{digits}g}"


def view(frame: "pd.DataFrame | None", skip: "tuple[str, ...]" = ()) -> "tuple[list[str], list[list[dict]]]":
    """A frame as header names and rows of cells {text, sort, missing, column} for the generic table macro."""
    if frame is None or frame.empty:
        return [], []
    columns = [c for c in frame.columns if c not in skip]
    rows = []
    for record in frame[columns].to_dict("records"):
        cells = []
        for column in columns:
            value = record[column]
            if is_missing(value):
                cells.append({"text": "—", "sort": "", "missing": True, "column": column})
            elif isinstance(value, bool):
                cells.append({"text": str(value).lower(), "sort": str(value).lower(), "missing": False,
                              "column": column})
            elif isinstance(value, (int, float)):
                cells.append({"text": figure(float(value), 4) if isinstance(value, float) else str(value),
                              "sort": repr(float(value)), "missing": False, "column": column})
            else:
                cells.append({"text": str(value), "sort": str(value), "missing": False, "column": column})
        rows.append(cells)
    return [str(c) for c in columns], rows


def _static(name: str) -> Markup:
    """A CSS or JS file shipped beside the templates, trusted as markup (it is ours, not data)."""
    return Markup((resources.files("cab.report") / "templates" / name).read_text(encoding="utf-8"))


@functools.lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    """The templates' environment, built once per process: it caches each compiled template, which a fresh
    environment per page compiled again (about 0.1 s a page, 76 attention pages on the quick grid)."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("cab.report", "templates"), autoescape=True,
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
    )
    env.filters["figure"] = figure
    env.filters["signed"] = signed
    env.filters["slug"] = slug
    env.globals["view"] = view
    env.globals["by_pattern"] = by_pattern
    env.globals["ordered_rows"] = ordered_rows
    return env


def _render_page(page: Page, sections, exports: "dict | None", root: str, **extra) -> str:
    template = environment().get_template("page.html.j2")
    home = f"{root}index.html" if root else ""
    context = dict(pattern="", subpage="", top=TOP)
    context.update(extra)
    return template.render(
        page=page, sections=sections, patterns=PATTERNS, cab_version=cab.__version__, exports=exports or {},
        css=_static("report.css"), js=_static("sortable.js"), root=root, home=home, shape_text=SHAPE_TEXT,
        pattern_file=lambda p: f"{root}{pattern_file(p)}", **context,
    )


def render_html(page: Page, exports: "dict | None" = None) -> str:
    """The leaderboard page (index.html) as an HTML string: rankings first, details on the other pages."""
    return _render_page(page, SECTIONS, exports, "")


def render_pattern_page(page: Page, pattern: str, exports: "dict | None" = None) -> str:
    """One pattern's page (in PATTERN_DIR): its whole ranking, its efficiency tables, plots and analyses."""
    return _render_page(page, PATTERN_SECTIONS, exports, "../", pattern=pattern)


def render_catalog_page(page: Page, exports: "dict | None" = None) -> str:
    """The seed-mechanism coverage table (catalog.html, beside index.html)."""
    return _render_page(page, (("catalog_page", "Seed-mechanism coverage"),), exports, "", subpage="catalogue")


def render_attention_page(page: Page, attention, exports: "dict | None" = None) -> str:
    """One attention's page (it lives in a sub-folder: links to the index go through `root`)."""
    template = environment().get_template("attention.html.j2")
    return template.render(
        page=page, a=attention, patterns=PATTERNS, cab_version=cab.__version__, exports=exports or {},
        css=_static("report.css"), js=_static("sortable.js"), root="../",
    )


def _write_atomically(path: Path, content: str) -> None:
    """Write through a temporary file and rename, so a reader never sees half a page."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(content, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def render_report(db_path: "str | Path", out_dir: "str | Path", fidelity_budget_s: float = DEFAULT_BUDGET_S) -> Path:
    """Render the leaderboard of the store at db_path into out_dir/index.html and return that path.

    Also writes a page per attention (out_dir/attention/*.html), a page per pattern (out_dir/pattern/*.html:
    the whole ranking, efficiency tables and plots), the catalogue (out_dir/catalog.html) and every table as
    CSV and Markdown
    (out_dir/tables/). Reads the store only, except the fidelity section, which runs the attentions at a
    tiny shape for at most `fidelity_budget_s` seconds (0 leaves it out). Declared support comes from the
    attentions registered in this process (call cab.registry.discover first to include plugins). Raises
    ReportError for a missing or empty store."""
    tables = read_tables(db_path)
    declarations = registry_declarations(sorted({str(a) for a in tables.results["attention"].dropna()}))
    page = build_page(tables, declarations, fidelity_budget_s=fidelity_budget_s)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    exports = write_exports(out, list(page.exports))
    (out / PAGES_DIR).mkdir(exist_ok=True)
    for attention in page.pages:
        _write_atomically(out / attention.file, render_attention_page(page, attention, exports))
    (out / PATTERN_DIR).mkdir(exist_ok=True)
    for pattern in page.patterns_with_results:
        _write_atomically(out / pattern_file(pattern), render_pattern_page(page, pattern, exports))
    if page.catalog:
        _write_atomically(out / CATALOG_FILE, render_catalog_page(page, exports))
    index = out / "index.html"
    _write_atomically(index, render_html(page, exports))
    return index
