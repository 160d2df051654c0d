"""The catalog on SQLite and on PostgreSQL: migrations from empty and from an older revision, concurrent
writers from two processes, secrets masked, and an unreachable or flapping database."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import inspect, select, text
from sqlalchemy.exc import IntegrityError

from featureatlas.schemas.artifacts import CorpusRef
from featureatlas.schemas.catalog import CorpusRow, LineageEdge
from featureatlas.tasks.tracking.catalog import Catalog, make_engine, migrate
from featureatlas.tasks.tracking.retry import ServiceUnavailable
from tests.pg import PASSWORD, free_port
from tests.tracking.catalog_writer import corpus_ref

REPO = Path(__file__).resolve().parents[2]


def test_empty_database_upgrades_to_head(db_url):
    cat = Catalog(db_url)
    tables = set(inspect(cat.engine).get_table_names())
    assert {"models", "corpora", "activation_caches", "dictionaries", "evaluations", "labelings",
            "interactions", "lineage_edges", "alembic_version"} <= tables  # fmt: skip
    with cat.engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0002"
    Catalog(db_url)  # at head already: opening again changes nothing


def test_older_database_upgrades_with_rows_intact(db_url):
    engine = make_engine(db_url)
    migrate(engine, "0001")
    assert "interactions" not in inspect(engine).get_table_names()
    ref = corpus_ref("old")
    with engine.begin() as conn:  # rows as a 0001-era featureatlas wrote them
        conn.execute(
            text(
                "INSERT INTO corpora (id, fingerprint, uri, mlflow_run_id, config, ref, created_at, "
                "n_documents, n_chars) VALUES (:id, :fp, :uri, 'r0', :config, :ref, :at, 3, 30)"
            ),
            {"id": ref.id, "fp": ref.fingerprint, "uri": ref.path, "config": json.dumps({"x": 1}),
             "ref": json.dumps(ref.model_dump(mode="json", exclude={"reused"})), "at": "2026-01-02 03:04:05"},
        )  # fmt: skip
        conn.execute(
            text("INSERT INTO lineage_edges VALUES (:c, :p, 'corpus', 'corpus', '2026-01-02 03:04:05')"),
            {"c": ref.id, "p": "corpus-parent"},
        )
    engine.dispose()

    cat = Catalog(db_url)
    assert "interactions" in inspect(cat.engine).get_table_names()
    assert CorpusRef.model_validate(cat.find("corpus", ref.fingerprint)) == ref
    kind, row = cat.get(ref.id)
    assert kind == "corpus" and row.config == {"x": 1} and row.n_chars == 30
    assert cat.parents(ref.id) == ["corpus-parent"]


def test_two_processes_register_at_once_without_loss_or_duplicates(db_url, tmp_path):
    cat = Catalog(db_url)
    root = corpus_ref("root")
    cat.register(root, [], {}, n_documents=3, n_chars=30)
    go = tmp_path / "go"
    env = os.environ | {"PYTHONPATH": str(REPO)}
    # 0-59 and 30-89: the 30 in the middle are registered by both processes, racing
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.tracking.catalog_writer",
                db_url,
                str(a),
                str(b),
                str(tmp_path / f"ready{a}"),
                str(go),
            ],  # fmt: skip
            env=env,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for a, b in ((0, 60), (30, 90))
    ]
    deadline = time.monotonic() + 240
    while not all((tmp_path / f"ready{a}").exists() for a in (0, 30)):
        assert all(p.poll() is None for p in procs), [p.communicate()[1] for p in procs]
        assert time.monotonic() < deadline, "the writers did not start within 240 s"
        time.sleep(0.05)
    go.touch()  # both have opened the catalog and wait at the start line
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    with cat.engine.connect() as conn:
        ids = conn.execute(select(CorpusRow.id)).scalars().all()
        edges = conn.execute(select(LineageEdge.child_id, LineageEdge.parent_id)).all()
    expected = {corpus_ref(f"c{i}").id for i in range(90)}
    assert len(ids) == len(set(ids)) == 91 and set(ids) == expected | {root.id}
    assert sorted(edges) == sorted((c, root.id) for c in expected)


def test_secrets_are_masked_in_the_catalog(db_url, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefghijklmnopqrstuvwx")
    cat = Catalog(db_url)
    ref = corpus_ref("secret", sources=["postgresql+psycopg://lab:hunter22@db.lab/corpus"])
    config = {"hf_token": "hf_abcdefghijklmnopqrstuvwx", "note": "uses hf_abcdefghijklmnopqrstuvwx",
              "max_tokens": 4096, "db": f"postgresql+psycopg://u:{PASSWORD}@h/d"}  # fmt: skip
    cat.register(ref, [], config, n_documents=3, n_chars=30)
    with cat.engine.connect() as conn:
        stored = json.dumps([list(r) for r in conn.execute(text("SELECT config, ref FROM corpora"))])
    for secret in ("hf_abcdefghijklmnopqrstuvwx", "hunter22", PASSWORD):
        assert secret not in stored
    _, row = cat.get(ref.id)
    assert row.config == {"hf_token": "***", "note": "uses ***", "max_tokens": 4096,
                          "db": "postgresql+psycopg://u:***@h/d"}  # fmt: skip
    assert row.ref["spec"]["sources"] == ["postgresql+psycopg://lab:***@db.lab/corpus"]


def test_unreachable_database_fails_clearly_naming_the_masked_url(monkeypatch, caplog):
    monkeypatch.setenv("FEATUREATLAS_RETRY_ATTEMPTS", "3")
    port = free_port()  # nothing listens here
    url = f"postgresql+psycopg://lab:{PASSWORD}@127.0.0.1:{port}/catalog"
    with caplog.at_level(logging.WARNING, "featureatlas.retry"), pytest.raises(ServiceUnavailable) as e:
        Catalog(url)
    message = str(e.value)
    assert f"postgresql+psycopg://lab:***@127.0.0.1:{port}/catalog" in message
    assert "after 3 attempts" in message and "FEATUREATLAS_CATALOG_URL" in message
    assert PASSWORD not in message and PASSWORD not in caplog.text
    waits = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(waits) == 2 and "retrying in 0.5 s" in waits[0] and "retrying in 1.0 s" in waits[1]


def test_registration_rides_out_a_database_restart(pg_cluster, monkeypatch):
    monkeypatch.setenv("FEATUREATLAS_RETRY_ATTEMPTS", "8")
    cat = Catalog(pg_cluster.url(pg_cluster.create_database()))
    cat.register(corpus_ref("before"), [], {}, n_documents=3, n_chars=30)
    pg_cluster.stop()
    restart = threading.Timer(2.0, pg_cluster.start)
    restart.start()
    try:
        cat.register(corpus_ref("during"), [corpus_ref("before")], {}, n_documents=3, n_chars=30)
    finally:
        restart.join()
    assert {r.id for _, r in cat.list("corpus")} == {corpus_ref("before").id, corpus_ref("during").id}
    assert cat.parents(corpus_ref("during").id) == [corpus_ref("before").id]


def test_a_failed_registration_leaves_no_row_and_no_edge(db_url):
    cat = Catalog(db_url)
    parent, child = corpus_ref("parent"), corpus_ref("child")
    cat.register(parent, [], {}, n_documents=3, n_chars=30)
    # the same edge twice breaks the edge table's primary key after the row was added in the transaction
    with pytest.raises(IntegrityError):
        cat.register(child, [parent, parent], {}, n_documents=3, n_chars=30)
    assert cat.get(child.id) is None and cat.parents(child.id) == []
    cat.register(child, [parent], {}, n_documents=3, n_chars=30)  # nothing in the way of a correct retry
    assert cat.parents(child.id) == [parent.id]
