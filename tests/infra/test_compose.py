"""infra/compose.yaml and its profile, checked by structure (Docker does not run in the test environment):
the services a lab needs, wired to each other and to PostgreSQL, published on loopback only, no password
written into the file, and a profile whose URLs reach exactly those services."""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml
from sqlalchemy.engine import make_url

from featureatlas.schemas.settings import Settings
from featureatlas.tasks.tracking.env import configure_environment

INFRA = Path(__file__).resolve().parents[2] / "infra"


def compose() -> dict:
    return yaml.safe_load((INFRA / "compose.yaml").read_text())


def test_services_and_their_wiring():
    c = compose()
    services = c["services"]
    assert set(services) == {"postgres", "mlflow", "prefect", "dask-scheduler", "dask-worker"}
    for name in ("mlflow", "prefect"):
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])

    mlflow = services["mlflow"]
    backend = make_url(mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"])
    assert (backend.drivername, backend.host, backend.database) == (
        "postgresql+psycopg", "postgres", "mlflow"
    )  # fmt: skip
    assert "--serve-artifacts" in mlflow["command"]
    assert "--artifacts-destination /mlartifacts" in mlflow["command"]
    assert "mlartifacts:/mlartifacts" in mlflow["volumes"]

    prefect_db = make_url(services["prefect"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"])
    assert (prefect_db.drivername, prefect_db.host, prefect_db.database) == (
        "postgresql+asyncpg", "postgres", "prefect"
    )  # fmt: skip
    worker = services["dask-worker"]
    assert "tcp://dask-scheduler:8786" in worker["command"] and worker["deploy"]["replicas"] >= 2
    # one thread a worker (tasks in one process share its hooked model), and no stack-sampling profiler
    assert "--nthreads 1" in worker["command"]
    assert worker["environment"]["DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED"] == "False"
    assert "--port 8786" in services["dask-scheduler"]["command"]
    worker_catalog = make_url(worker["environment"]["FEATUREATLAS_CATALOG_URL"])
    assert (worker_catalog.host, worker_catalog.database) == ("postgres", "catalog")
    assert worker["environment"]["FEATUREATLAS_MLFLOW_TRACKING_URI"] == "http://mlflow:5000"

    # every database a URL names is created: catalog by POSTGRES_DB, the others by the init script
    init = (INFRA / "postgres-init.sql").read_text()
    pg = services["postgres"]
    created = {pg["environment"]["POSTGRES_DB"], *re.findall(r"CREATE DATABASE (\w+)", init)}
    assert {"catalog", "mlflow", "prefect"} == created
    assert "./postgres-init.sql:/docker-entrypoint-initdb.d/10-databases.sql:ro" in pg["volumes"]
    # the images are built from the repository's own Dockerfile
    assert (INFRA / mlflow["build"]["dockerfile"].removeprefix("infra/")).is_file()
    assert set(c["volumes"]) == {"pgdata", "mlartifacts", "artifacts"}


def test_ports_on_loopback_and_no_password_in_the_file():
    text = (INFRA / "compose.yaml").read_text()
    published = [p for s in compose()["services"].values() for p in s.get("ports", [])]
    assert len(published) == 5 and all(p.startswith("127.0.0.1:") for p in published)
    # every password comes from the profile at `up` time
    for url in re.findall(r"postgresql\+\w+://[^\s'\"]+", text):
        assert make_url(url.replace("${FEATUREATLAS_DB_PASSWORD}", "PW")).password == "PW"
    assert "${FEATUREATLAS_DB_PASSWORD:?" in text


def test_profile_points_settings_at_the_published_services(monkeypatch, tmp_path):
    for var in ("CATALOG_URL", "MLFLOW_TRACKING_URI", "PREFECT_API_URL"):
        monkeypatch.delenv(f"FEATUREATLAS_{var}", raising=False)
    monkeypatch.setenv("FEATUREATLAS_ENV_FILE", str(INFRA / "featureatlas.env"))
    s = Settings()
    catalog = make_url(s.catalog)
    assert (catalog.drivername, catalog.host, catalog.port, catalog.database) == (
        "postgresql+psycopg", "127.0.0.1", 5432, "catalog"
    )  # fmt: skip
    assert catalog.password == "change-me"  # interpolated from FEATUREATLAS_DB_PASSWORD in the same file
    assert s.mlflow_uri == "http://127.0.0.1:5000" and s.prefect_api_url == "http://127.0.0.1:4200/api"
    ports = {p.split(":")[1] for svc in compose()["services"].values() for p in svc.get("ports", [])}
    assert {"5432", "5000", "4200"} <= ports
    # Prefect itself is pointed at the profile's server (unless PREFECT_API_URL is already set)
    monkeypatch.setenv("PREFECT_API_URL", "placeholder")
    monkeypatch.delenv("PREFECT_API_URL")
    configure_environment(s.model_copy(update={"home": tmp_path / "home"}))
    assert os.environ["PREFECT_API_URL"] == "http://127.0.0.1:4200/api"

    # the environment wins over the profile; a missing profile is an error that says what to do
    monkeypatch.setenv("FEATUREATLAS_MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert Settings().mlflow_uri == "http://127.0.0.1:5999"
    monkeypatch.setenv("FEATUREATLAS_ENV_FILE", str(tmp_path / "missing.env"))
    try:
        Settings()
    except FileNotFoundError as e:
        assert "FEATUREATLAS_ENV_FILE" in str(e) and "unset it" in str(e)
    else:
        raise AssertionError("a missing profile was ignored")
