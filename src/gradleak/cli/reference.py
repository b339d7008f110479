"""``gradleak reference``: the generated reference page of every attack, defense and option."""

from __future__ import annotations

from typing import Optional

import typer

from ._common import app, friendly, stdout


@app.command()
@friendly
def reference(
    out: Optional[str] = typer.Option(None, "--out", help="Markdown file to write (atomically); default: print "
                                                          "the page. The repository's copy is docs/reference.md."),
):
    """Every attack, defense, model, threat-model and client setting, and every command with its
    options, generated from the registries as one Markdown page."""
    from .._io import output_file
    from ..reference import reference_markdown, write_reference

    if out is None:
        print(reference_markdown(app), end="", file=stdout())
        return
    write_reference(output_file(out), app)
    typer.echo(f"wrote {out}", err=True)
