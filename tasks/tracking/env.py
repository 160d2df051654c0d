"""Point Prefect, MLflow and Hugging Face at the featureatlas home, offline and quiet.

Called by the CLI and by tests before Prefect or MLflow is imported, so that nothing is written to the
user's home folder or the working directory by surprise, and nothing tries the network.
"""

from __future__ import annotations

import os

from featureatlas.schemas.settings import Settings
from featureatlas.tasks.tracking.secrets import install_log_masking, register_url


def configure_environment(settings: Settings | None = None) -> Settings:
    settings = settings or Settings()
    home = settings.home_dir
    home.mkdir(parents=True, exist_ok=True)
    defaults = {
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # the 20 s default is too short for the temporary server on a busy 2-core machine
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        "PREFECT_LOGGING_LEVEL": "INFO",
        "MLFLOW_TRACKING_URI": settings.mlflow_uri,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        # MLflow's own HTTP retries (default: 7, for minutes) under featureatlas' retries with backoff
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
        "DO_NOT_TRACK": "1",
        "HF_HOME": str(home / "hf"),
        "TOKENIZERS_PARALLELISM": "false",
        "GIT_PYTHON_REFRESH": "quiet",
    }
    if not settings.online:
        defaults |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    if settings.prefect_api_url:
        defaults["PREFECT_API_URL"] = settings.prefect_api_url
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    for url in (settings.catalog_url, settings.mlflow_tracking_uri, settings.mlflow_backend_uri,
                settings.prefect_database_url):  # fmt: skip
        register_url(url)
    install_log_masking()
    return settings
