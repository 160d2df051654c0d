"""The SQL catalog: migrations, idempotent registration, lookup by fingerprint, lineage edges."""

from __future__ import annotations

from sqlalchemy import inspect

from featureatlas.schemas.artifacts import CorpusRef
from featureatlas.schemas.spec import CorpusSpec
from featureatlas.tasks.tracking.catalog import Catalog
from featureatlas.tasks.tracking.identity import corpus_identity, identity


def corpus_ref(tmp_path, name: str) -> CorpusRef:
    ident = identity("corpus", {"name": name}, [])
    return CorpusRef(
        id=ident.id,
        fingerprint=ident.fingerprint,
        path=str(tmp_path / name),
        mlflow_run_id="r1",
        spec=CorpusSpec(),
        n_documents=3,
        n_chars=30,
    )


def test_migrations_create_every_table(tmp_path):
    cat = Catalog(f"sqlite:///{tmp_path / 'c.db'}")
    tables = set(inspect(cat.engine).get_table_names())
    assert {
        "models",
        "corpora",
        "activation_caches",
        "dictionaries",
        "evaluations",
        "labelings",
        "lineage_edges",
        "alembic_version",
    } <= tables
    Catalog(cat.url)  # opening again (already at head) is a no-op


def test_register_find_and_lineage(tmp_path):
    cat = Catalog(f"sqlite:///{tmp_path / 'c.db'}")
    a, b = corpus_ref(tmp_path, "a"), corpus_ref(tmp_path, "b")
    cat.register(a, [], {"x": 1}, n_documents=3, n_chars=30)
    cat.register(b, [a], {"x": 2}, n_documents=3, n_chars=30)
    cat.register(b, [a], {"x": 2}, n_documents=3, n_chars=30)  # idempotent
    assert len(cat.list("corpus")) == 2
    found = cat.find("corpus", b.fingerprint)
    assert CorpusRef.model_validate(found) == b
    assert cat.find("corpus", "0" * 64) is None
    assert cat.parents(b.id) == [a.id] and cat.children(a.id) == [b.id]
    assert cat.get(b.id)[0] == "corpus" and cat.get("nope") is None


def test_fingerprints_follow_config_and_inputs():
    x = identity("dictionary", {"k": 4}, ["p"])
    assert identity("dictionary", {"k": 4}, ["p"]) == x
    assert identity("dictionary", {"k": 5}, ["p"]).fingerprint != x.fingerprint
    assert identity("dictionary", {"k": 4}, ["q"]).fingerprint != x.fingerprint
    assert x.id == f"dict-{x.fingerprint[:12]}"


def test_corpus_fingerprint_follows_file_content(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("one")
    spec = CorpusSpec(sources=[str(f)])
    first = corpus_identity(spec)
    f.write_text("two, longer")
    assert corpus_identity(spec).fingerprint != first.fingerprint
