"""One of the processes in the concurrent-writers test: registers corpora `first..last-1` under a root.

Usage: python -m tests.tracking.catalog_writer URL FIRST LAST READY_FILE GO_FILE. It opens the catalog,
touches READY_FILE, waits for GO_FILE, then registers as fast as it can, so the writers really race.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from featureatlas.schemas.artifacts import CorpusRef
from featureatlas.schemas.spec import CorpusSpec
from featureatlas.tasks.tracking.catalog import Catalog
from featureatlas.tasks.tracking.identity import identity


def corpus_ref(name: str, **spec) -> CorpusRef:
    ident = identity("corpus", {"name": name}, [])
    return CorpusRef(
        id=ident.id,
        fingerprint=ident.fingerprint,
        path=f"/data/{name}",
        mlflow_run_id="r1",
        spec=CorpusSpec(**spec),
        n_documents=3,
        n_chars=30,
    )


def main(url: str, first: int, last: int, ready: Path, go: Path) -> None:
    cat = Catalog(url)
    root = corpus_ref("root")
    ready.touch()
    while not go.exists():
        time.sleep(0.005)
    for i in range(first, last):
        cat.register(corpus_ref(f"c{i}"), [root], {"i": i}, n_documents=3, n_chars=30)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]), Path(sys.argv[5]))
