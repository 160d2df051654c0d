"""Test-wide set-up: state in a temporary home (never the user's), offline, seeded."""

from __future__ import annotations

import os
import random
import tempfile

_HOME = tempfile.mkdtemp(prefix="featureatlas-test-")
os.environ["FEATUREATLAS_HOME"] = _HOME

from featureatlas.schemas.settings import Settings  # noqa: E402
from featureatlas.tasks.tracking.env import configure_environment  # noqa: E402

configure_environment(Settings())

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    # The sparse-path kernels' CPU tests run in Triton's interpreter, which Triton reads when it is first
    # imported (torch may import it early, e.g. while a test module loads): set it before any of that.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def home(request, tmp_path, monkeypatch) -> Settings:
    """A fresh featureatlas home for one test: its own catalog, MLflow store and artifacts.

    In a test that also takes `backend`, the catalog and MLflow store are on that backend.
    """
    monkeypatch.setenv("FEATUREATLAS_HOME", str(tmp_path / "home"))
    if "backend" in request.fixturenames:
        request.getfixturevalue("backend")  # its database URLs go into the environment first
    return Settings()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request, monkeypatch) -> str:
    """Run the test with its catalog and MLflow store in SQLite files (the default) or PostgreSQL.

    PostgreSQL: two fresh databases of the session's one throwaway cluster (`pg_cluster`), named by
    FEATUREATLAS_CATALOG_URL and FEATUREATLAS_MLFLOW_TRACKING_URI, so every `Settings()` the test and the
    flow build uses them. Skipped without the server binaries, failed instead under CI=true.
    """
    if request.param == "postgresql":
        from tests.pg import fresh_database_env

        for name, url in fresh_database_env(request.getfixturevalue("pg_cluster")).items():
            monkeypatch.setenv(name, url)
    return request.param


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def pg_cluster():
    """A throwaway PostgreSQL cluster on loopback; skipped only without the server binaries outside CI."""
    from tests.pg import remove_cluster, server_bin, start_cluster

    if server_bin() is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true but the PostgreSQL server binaries are missing: install `postgresql`")
        pytest.skip("PostgreSQL server binaries not installed (Debian package `postgresql`)")
    cluster = start_cluster()
    yield cluster
    remove_cluster(cluster)


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path) -> str:
    """A fresh, empty database URL on each backend: a SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'catalog.db'}"
    cluster = request.getfixturevalue("pg_cluster")
    return cluster.url(cluster.create_database())
