"""featureatlas: a declarative, tracked pipeline for finding the features inside neural networks.

Installed, everything lives under this one namespace: `featureatlas.schemas` (the typed contracts),
`featureatlas.tasks` (the work of each stage), `featureatlas.flows` (the Prefect flows and the CLI). In the
repository they keep their own top-level folders (`schemas/`, `tasks/`, `flows/`); `pyproject.toml` maps them
under `featureatlas` (this package's own files are `flows/api/`), so nothing installs a generic top-level
`tasks`, `schemas` or `flows` that a user's `tasks.py` could shadow or clash with.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("featureatlas")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
