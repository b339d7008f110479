"""Pictures and the HTML report of a run: reconstruction grids, curves, one self-contained page."""

from gradleak.report.figures import curves_figure, reconstruction_grid, share_notes
from gradleak.report.html import render_html, write_html_report

__all__ = ["reconstruction_grid", "curves_figure", "share_notes", "render_html", "write_html_report"]
