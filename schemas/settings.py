"""Where featureatlas keeps its state, read from `FEATUREATLAS_*` environment variables.

A profile is an env file of the same variables (`infra/featureatlas.env` points at the services of
`infra/compose.yaml`); `FEATUREATLAS_ENV_FILE=path` reads it, and variables set in the environment win.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, DotEnvSettingsSource, SettingsConfigDict


class Settings(BaseSettings):
    """All state lives under `home` unless a URL points elsewhere."""

    model_config = SettingsConfigDict(env_prefix="FEATUREATLAS_", frozen=True, extra="ignore")

    home: Path = Field(
        Path(".featureatlas"), description="Folder for the catalog, MLflow store and artifacts."
    )
    catalog_url: str | None = Field(
        None, description="SQLAlchemy URL of the catalog (default: SQLite in home)."
    )
    mlflow_tracking_uri: str | None = Field(
        None, description="MLflow tracking URI (default: SQLite in home)."
    )
    experiment: str = Field("featureatlas", description="MLflow experiment that pipeline runs go to.")
    online: bool = Field(False, description="Allow downloads from the model hub.")
    artifact_root: str | None = Field(
        None,
        description="Where artifact folders go: a local path or a file:// URL (default: <home>/artifacts).",
    )

    task_runner: Literal["threads", "dask"] = Field(
        "threads",
        description="How independent stage jobs (the dictionaries of a sweep) fan out: a thread pool in "
        "the flow's process, or a Dask cluster (`dask_address`, else a local cluster of max_workers).",
    )
    max_workers: int = Field(
        1,
        ge=1,
        description="Dictionary jobs run at once (threads, or local Dask worker processes); 1: in turn.",
    )
    dask_address: str | None = Field(
        None, description="Scheduler of a running Dask cluster, e.g. tcp://10.0.0.5:8786 (task_runner: dask)."
    )

    db_connect_timeout_s: float = Field(
        8.0,
        gt=0,
        description="Seconds one connection attempt to a catalog or MLflow database server may take; with "
        "the retries (FEATUREATLAS_RETRY_ATTEMPTS, default 5) a server that never answers fails within a "
        "minute.",
    )
    db_statement_timeout_s: float = Field(
        60.0,
        gt=0,
        description="Seconds the database server lets one catalog or MLflow statement run before "
        "cancelling it.",
    )

    @field_validator("artifact_root")
    @classmethod
    def _check_artifact_root(cls, value: str | None) -> str | None:
        if value is not None:
            artifact_root_path(value)  # raises with the list of what is supported
        return value

    prefect_api_url: str | None = Field(
        None,
        description="Prefect server API, e.g. http://127.0.0.1:4200/api (default: a temporary server "
        "per run).",
    )
    mlflow_backend_uri: str | None = Field(
        None,
        description="Database the MLflow server of `featureatlas server start` keeps runs in (default: the "
        "tracking URI when it is a database, else SQLite in home).",
    )
    prefect_database_url: str | None = Field(
        None,
        description="Database of the Prefect server that `featureatlas server start` runs (default: SQLite "
        "in home); PostgreSQL as postgresql+asyncpg://user:password@host:5432/prefect.",
    )
    server_host: str = Field(
        "127.0.0.1", description="Interface `featureatlas server start` binds; loopback unless told."
    )
    mlflow_port: int = Field(5000, description="Port of the MLflow server that `featureatlas server` runs.")
    prefect_port: int = Field(4200, description="Port of the Prefect server that `featureatlas server` runs.")

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ):
        """Init arguments, then the environment, then the profile in FEATUREATLAS_ENV_FILE (if set)."""
        sources = [init_settings, env_settings, dotenv_settings, file_secret_settings]
        profile = os.environ.get("FEATUREATLAS_ENV_FILE")
        if profile:
            if not Path(profile).is_file():
                raise FileNotFoundError(
                    f"FEATUREATLAS_ENV_FILE={profile!r} does not exist; point it at a profile such as "
                    "infra/featureatlas.env, or unset it"
                )
            sources.insert(2, DotEnvSettingsSource(settings_cls, env_file=profile))
        return tuple(sources)

    @property
    def home_dir(self) -> Path:
        return self.home.expanduser().resolve()

    @property
    def artifacts_dir(self) -> Path:
        if self.artifact_root is None:
            return self.home_dir / "artifacts"
        return artifact_root_path(self.artifact_root).expanduser().resolve()

    @property
    def catalog(self) -> str:
        return self.catalog_url or f"sqlite:///{self.home_dir / 'catalog.db'}"

    @property
    def mlflow_uri(self) -> str:
        return self.mlflow_tracking_uri or f"sqlite:///{self.home_dir / 'mlflow.db'}"

    @property
    def mlflow_artifacts_dir(self) -> Path:
        return self.home_dir / "mlflow-artifacts"


SUPPORTED_ARTIFACT_SCHEMES = ("file",)


def artifact_root_path(url: str) -> Path:
    """The local folder an artifact-root URL names: a plain path, or `file:///abs/path` (`file://localhost/`).

    Stages write artifacts with ordinary file operations and hand their paths to the next stage, so only
    URLs that resolve to a mounted filesystem are accepted; anything else is refused here, before any run.
    """
    parts = urlsplit(url)
    # a one-letter "scheme" is a Windows drive letter, not a URL
    if not parts.scheme or len(parts.scheme) == 1:
        return Path(url)
    if parts.scheme in SUPPORTED_ARTIFACT_SCHEMES:
        if parts.netloc not in ("", "localhost"):
            raise ValueError(
                f"artifact root {url!r}: a file:// URL names this machine's filesystem, not host "
                f"{parts.netloc!r}; write file:///absolute/path (three slashes), or mount the share and give "
                "its local path"
            )
        if not parts.path.startswith("/"):
            raise ValueError(
                f"artifact root {url!r}: a file:// URL needs an absolute path (file:///abs/path)"
            )
        return Path(unquote(parts.path))
    raise ValueError(
        f"artifact root {url!r}: scheme {parts.scheme!r} is not supported yet; supported: a local path or "
        f"{', '.join(s + '://' for s in SUPPORTED_ARTIFACT_SCHEMES)} URLs. Object storage (s3://, gs://, "
        "...) works through a filesystem mount (e.g. s3fs, gcsfuse) given as a local path or file:// URL"
    )
