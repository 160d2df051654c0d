"""featureatlas: a declarative, tracked pipeline for finding the features inside neural networks.

The public API, for notebooks and scripts (everything the command line prints is available here as data):

    import featureatlas as fa

    result = fa.run("spec.yaml")                  # or fa.run(spec_dict); plan=True only plans
    cat = fa.catalog()                            # the catalog of FEATUREATLAS_HOME (default ./.featureatlas)
    cat.list(kind="dictionary", where="fvu < 0.3")   # Polars frame: method, hookpoint, d_sae, k, fvu, l0, ...
    cat.lineage("dict-0123abcd4567")              # ancestors and descendants
    sae = fa.load_dictionary("dict-0123abcd4567") # encode / decode / decoder_directions
    cache = fa.load_cache("dict-0123abcd4567")    # the activations it was trained on; .stream(hookpoint)
    table = fa.features("dict-0123abcd4567")      # labels, frequencies, top contexts per latent
    report = fa.evaluation("dict-0123abcd4567")   # FVU, L0, CE-loss score, details
    fa.compare()                                  # every evaluated dictionary: the frontier as a frame
    fa.train({"method": "topk", "d_sae": 256, "k": 8}, acts)   # one dictionary on a tensor in memory

Installed, everything lives under this one namespace: `featureatlas.schemas` (the typed contracts),
`featureatlas.tasks` (the work of each stage), `featureatlas.flows` (the Prefect flows and the CLI). In the
repository they keep their own top-level folders (`schemas/`, `tasks/`, `flows/`); `pyproject.toml` maps them
under `featureatlas` (this package's own files are `flows/api/`), so nothing installs a generic top-level
`tasks`, `schemas` or `flows` that a user's `tasks.py` could shadow or clash with.

Importing this package is cheap: torch, Prefect, MLflow and Polars are imported by the functions that use
them.
"""

from importlib.metadata import PackageNotFoundError, version

from featureatlas.artifacts import (
    atlas,
    compare,
    evaluation,
    features,
    load_cache,
    load_dictionary,
    search_features,
)
from featureatlas.catalog_view import CatalogView, Lineage, catalog
from featureatlas.pipelines import demo_spec, load_spec, plan, run, train

try:
    __version__ = version("featureatlas")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

__all__ = [
    "CatalogView",
    "Lineage",
    "atlas",
    "catalog",
    "compare",
    "demo_spec",
    "evaluation",
    "features",
    "load_cache",
    "load_dictionary",
    "load_spec",
    "plan",
    "run",
    "search_features",
    "train",
]
