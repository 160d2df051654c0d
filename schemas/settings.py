"""Where featureatlas keeps its state, read from `FEATUREATLAS_*` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


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
