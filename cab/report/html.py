"""Renders the leaderboard page model to one self-contained HTML file (CSS and JS inlined, no network).

Every value from the store, the registry or a plugin goes through jinja2 with autoescape on. The page
is the sections below in order, each a template `_<name>.html.j2`: a new section (plots, accuracy)
is one template and one entry here plus what it needs in the page model.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import jinja2
from markupsafe import Markup

import cab
from cab.report.aggregate import Page, build_page
from cab.report.fields import slug
from cab.report.load import read_store
from cab.report.support import PATTERNS, registry_declarations

SECTIONS = (
    ("overview", "Overview"),
    ("support", "Pattern support"),
    ("efficiency", "Efficiency"),
    ("failures", "Failures"),
)


def figure(value: "float | None", digits: int = 3) -> str:
    """A number with `digits` significant figures, without exponent for values up to 10**digits; '—' for None."""
    if value is None:
        return "—"
    if abs(value) >= 10 ** digits:
        return f"{value:.0f}"
    return f"{value:.{digits}g}"


def _static(name: str) -> Markup:
    """A CSS or JS file shipped beside the templates, trusted as markup (it is ours, not data)."""
    return Markup((resources.files("cab.report") / "templates" / name).read_text(encoding="utf-8"))


def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("cab.report", "templates"), autoescape=True,
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
    )
    env.filters["figure"] = figure
    env.filters["slug"] = slug
    return env


def render_html(page: Page) -> str:
    """The leaderboard page as an HTML string."""
    template = environment().get_template("page.html.j2")
    return template.render(
        page=page, sections=SECTIONS, patterns=PATTERNS, cab_version=cab.__version__,
        css=_static("report.css"), js=_static("sortable.js"),
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


def render_report(db_path: "str | Path", out_dir: "str | Path") -> Path:
    """Render the leaderboard of the store at db_path into out_dir/index.html and return that path.

    Reads the store only. Declared support comes from the attentions registered in this process (call
    cab.registry.discover first to include plugins). Raises ReportError for a missing or empty store."""
    results, runs = read_store(db_path)
    declarations = registry_declarations(sorted({str(a) for a in results["attention"].dropna()}))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index = out / "index.html"
    _write_atomically(index, render_html(build_page(results, runs, declarations)))
    return index
