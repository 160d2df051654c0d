"""Where featureatlas keeps its state, read from `FEATUREATLAS_*` environment variables.

A profile is an env file of the same variables (`infra/featureatlas.env` points at the services of
`infra/compose.yaml`); `FEATUREATLAS_ENV_FILE=path` reads it, and variables set in the environment win.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field
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
        return self.home_dir / "artifacts"

    @property
    def catalog(self) -> str:
        return self.catalog_url or f"sqlite:///{self.home_dir / 'catalog.db'}"

    @property
    def mlflow_uri(self) -> str:
        return self.mlflow_tracking_uri or f"sqlite:///{self.home_dir / 'mlflow.db'}"

    @property
    def mlflow_artifacts_dir(self) -> Path:
        return self.home_dir / "mlflow-artifacts"
