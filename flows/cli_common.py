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


def conventional_help() -> None:
    """Help in the usual notation: `SPEC` for a required argument (typer writes `{spec}`) and no `<bool>`
    after a flag, which takes no value. Typer renders both from these two methods, so they are replaced
    once, for every command."""
    from typer.core import TyperArgument, TyperOption

    if getattr(TyperOption, "_featureatlas_help", False):
        return
    option_type = TyperOption.display_type_rich

    def display_type_rich(self, ctx):
        return None if self.is_flag and self.metavar is None else option_type(self, ctx)

    def usage_name(self) -> str:
        name = self.metavar or self.name.upper()
        name = name if self.required else f"[{name}]"
        return name + ("..." if self.nargs != 1 else "")

    TyperOption.display_type_rich = display_type_rich
    TyperArgument._usage_display_name = usage_name
    TyperOption._featureatlas_help = True
