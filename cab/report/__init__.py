"""The leaderboard: aggregates the results store with pandas and renders a self-contained HTML page."""

from cab.report.html import render_report
from cab.report.load import ReportError

__all__ = ["ReportError", "render_report"]
