"""A database server that accepts connections and never answers fails the catalog and the tracker within the
configured connect timeout, each retry logged, instead of holding each attempt for the TCP timeout."""

from __future__ import annotations

import logging
import socket
import time

import pytest

from featureatlas.tasks.tracking.catalog import Catalog
from featureatlas.tasks.tracking.mlflow_runs import Tracker
from featureatlas.tasks.tracking.retry import ServiceUnavailable
from featureatlas.tasks.tracking.timeouts import connect_args, with_timeouts


@pytest.fixture
def silent_port():
    """A loopback port whose kernel completes every TCP handshake while nobody ever reads or replies."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)  # never accepted: connections wait in the backlog, their bytes unanswered
        yield s.getsockname()[1]


@pytest.mark.parametrize("opener", ["catalog", "tracker"])
def test_a_server_that_never_answers_fails_within_the_connect_timeout(
    opener, silent_port, tmp_path, monkeypatch, caplog
):
    monkeypatch.setenv("FEATUREATLAS_RETRY_ATTEMPTS", "3")
    monkeypatch.setenv("FEATUREATLAS_DB_CONNECT_TIMEOUT_S", "2")
    url = f"postgresql+psycopg://lab:pw-1234@127.0.0.1:{silent_port}/db"
    start = time.monotonic()
    with caplog.at_level(logging.WARNING), pytest.raises(ServiceUnavailable, match="unreachable after 3"):
        Catalog(url) if opener == "catalog" else Tracker(url, "featureatlas", tmp_path)
    elapsed = time.monotonic() - start
    retries = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(retries) == 2 and all(f"127.0.0.1:{silent_port}" in m for m in retries)
    # 3 attempts of 2 s and 1.5 s of backoff; without a connect timeout one attempt alone takes over 2 minutes
    assert elapsed < 40, f"took {elapsed:.0f} s"


def test_timeouts_reach_the_driver_and_mlflow_url(monkeypatch):
    monkeypatch.setenv("FEATUREATLAS_DB_CONNECT_TIMEOUT_S", "5")
    monkeypatch.setenv("FEATUREATLAS_DB_STATEMENT_TIMEOUT_S", "1.5")
    url = "postgresql+psycopg://lab:pw@db:5432/x"
    assert connect_args(url) == {"connect_timeout": 5, "options": "-c statement_timeout=1500"}
    assert with_timeouts(url) == f"{url}?connect_timeout=5&options=-c+statement_timeout%3D1500"
    assert with_timeouts(f"{url}?connect_timeout=1").startswith(f"{url}?connect_timeout=1&options=")
    assert connect_args("sqlite:///a.db") == {} and with_timeouts("sqlite:///a.db") == "sqlite:///a.db"


def test_postgresql_sessions_carry_the_statement_timeout(pg_cluster, monkeypatch):
    from sqlalchemy import text

    monkeypatch.setenv("FEATUREATLAS_DB_STATEMENT_TIMEOUT_S", "1.5")
    catalog = Catalog(pg_cluster.url(pg_cluster.create_database()))
    with catalog.engine.connect() as conn:
        assert conn.execute(text("SHOW statement_timeout")).scalar() == "1500ms"
