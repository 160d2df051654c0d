"""What every command of the `featureatlas` CLI shares: the console, errors, settings."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from featureatlas.schemas.settings import Settings
from featureatlas.tasks.tracking.env import configure_environment

# piped output (logs, CI, README examples) is not cut to 80 columns
console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print an error unwrapped on stderr (so it can be grepped and copied) and return the exit to raise."""
    typer.secho(message, err=True, fg="red")
    return typer.Exit(code)


def settings() -> Settings:
    return configure_environment(Settings())


def open_catalog_from_settings():
    from featureatlas.tasks.tracking.catalog import open_catalog

    return open_catalog(settings().catalog)
