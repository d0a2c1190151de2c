"""The `beit` command: one sub-command per job. Thin by design: parse, validate, call the stage.

A `BeitError` raised anywhere below becomes one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import typer

from beit.errors import BeitError

app = typer.Typer(
    help="BEiT: offline tokenization to WebDataset shards, masked-image-modeling pretraining, fine-tuning.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except BeitError as err:
        typer.echo(f"error: {err}", err=True)
        raise SystemExit(err.exit_code) from None
