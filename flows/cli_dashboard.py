"""`featureatlas dashboard`: the feature atlas of a dictionary or of a pipeline run, static or served.

Static (the default) prints the `file://` address of the atlas index: a dictionary's own, or for a pipeline
run an index across its dictionaries written next to the run's result. `--serve` serves the same pages on
127.0.0.1 with the model loaded, so each feature page's "try it" box shows the feature's activation on every
token of a text the user types.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from featureatlas.flows.cli_common import console, fail
from featureatlas.flows.cli_common import open_catalog_from_settings as _catalog
from featureatlas.flows.cli_common import settings as current_settings


def dashboard(
    target: Annotated[
        Optional[str],  # noqa: UP045 (typer reads the annotation at run time)
        typer.Argument(
            help="Dictionary or labeling id (dict-0123abcd4567), or a pipeline's MLflow run id; "
            "default: the newest pipeline run with an atlas."
        ),
    ] = None,
    open_browser: Annotated[bool, typer.Option("--open", help="Also open it in the web browser.")] = False,
    serve: Annotated[
        bool, typer.Option("--serve", help="Serve it on 127.0.0.1 with the model loaded (the try-it box).")
    ] = False,
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1 for --serve (0: any free port).")] = 8765,
    device: Annotated[str, typer.Option(help="Device of the dictionaries for --serve.")] = "cpu",
) -> None:
    """Open a feature atlas: print its address, or with --serve run it with a "try it" box."""
    from featureatlas.tasks.labeling.atlas_set import resolve_atlases, write_run_index

    settings = current_settings()
    try:
        atlases = resolve_atlases(_catalog(), settings.home_dir, target)
    except ValueError as e:
        raise fail(str(e)) from None
    if not serve:
        if atlases.run_id is None:
            index = atlases.entries[0].atlas / "index.html"
        else:
            index = write_run_index(atlases, settings.home_dir)
        print(index.as_uri())
        if open_browser:
            import webbrowser

            webbrowser.open(index.as_uri())
        return
    from featureatlas.tasks.labeling.serve import TryIt, make_server, server_url

    with console.status("loading the model and dictionaries"):
        tryit = TryIt(atlases.entries, device)
    try:
        server = make_server(atlases, tryit, port)
    except OSError as e:
        raise fail(f"cannot serve on 127.0.0.1:{port} ({e.strerror}); pick another with --port") from None
    url = server_url(server)
    console.print(f"feature atlas on {url} ({len(atlases.entries)} dictionaries); Ctrl-C stops it")
    if open_browser:
        import webbrowser

        webbrowser.open(url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
