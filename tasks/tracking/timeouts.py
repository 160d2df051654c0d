"""Connect and statement timeouts for the database servers behind the catalog and the MLflow store.

Without them, a server that accepts connections but never answers (a hung host, a full proxy) holds each
attempt for the operating system's TCP timeout (psycopg waited 130 s per attempt, 11 minutes in all, saying
nothing). Each connection attempt may take `db_connect_timeout_s` (8 s), so with the retries and their
backoff a dead server fails in under a minute, each retry logged; the server cancels any one statement after
`db_statement_timeout_s` (60 s). SQLite has its own busy timeout (see `catalog.make_engine`); other databases
are left to their drivers.
"""

from __future__ import annotations

import math

from sqlalchemy.engine import make_url

from featureatlas.schemas.settings import Settings


def _is_postgresql(url: str) -> bool:
    return url.split(":", 1)[0].split("+")[0] in {"postgresql", "postgres"}


def _timeouts() -> tuple[int, int]:
    settings = Settings()
    # libpq counts connect_timeout in whole seconds (and takes 1 as 2); the statement timeout in milliseconds
    connect = max(2, math.ceil(settings.db_connect_timeout_s))
    return connect, round(settings.db_statement_timeout_s * 1000)


def connect_args(url: str) -> dict:
    """`connect_args` for `create_engine(url)`: the timeouts, for PostgreSQL; nothing for other databases."""
    if not _is_postgresql(url):
        return {}
    connect, statement = _timeouts()
    return {"connect_timeout": connect, "options": f"-c statement_timeout={statement}"}


def with_timeouts(url: str) -> str:
    """`url` with the timeouts in its query, for clients that build their own engine from a URL (MLflow's
    database store); parameters the URL already sets are kept."""
    if not _is_postgresql(url):
        return url
    parsed = make_url(url)
    extra = {k: str(v) for k, v in connect_args(url).items() if k not in parsed.query}
    if not extra:
        return url
    return parsed.update_query_dict(extra).render_as_string(hide_password=False)
