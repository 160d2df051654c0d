"""Retries with exponential backoff for database and tracking writes, and the error when a service is down.

Only writes that are safe to repeat go through `retrying` (a catalog registration is one transaction and
idempotent; MLflow params, tags and metrics are idempotent or append-only), never training. A failure is
transient when the connection failed or SQLite was busy; anything else (a constraint, a bad request)
raises at once. When the retries run out, `ServiceUnavailable` names the service and its URL (password
masked) and says what to check.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TypeVar

import tenacity
from sqlalchemy.exc import DisconnectionError, OperationalError

from featureatlas.tasks.tracking.errors import Refusal
from featureatlas.tasks.tracking.secrets import mask_text, mask_url, register_url

T = TypeVar("T")
log = logging.getLogger("featureatlas.retry")


class ServiceUnavailable(Refusal):
    """The catalog database or the MLflow tracking server could not be reached, even after retries."""


def _transient_one(exc: BaseException) -> bool:
    if isinstance(exc, (OperationalError, DisconnectionError, ConnectionError, TimeoutError)):
        return True
    try:
        import requests

        if isinstance(exc, (requests.ConnectionError, requests.Timeout)):
            return True
    except ImportError:  # requests comes with MLflow; without it there is nothing of its kind to catch
        pass
    return False


def is_transient(exc: BaseException) -> bool:
    """Whether `exc` or anything it was raised from is a connection failure or a busy database."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if _transient_one(cur):
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False


def attempts() -> int:
    """How many times a write is tried in all (`FEATUREATLAS_RETRY_ATTEMPTS`, default 5)."""
    return max(1, int(os.environ.get("FEATUREATLAS_RETRY_ATTEMPTS", "5")))


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return mask_text(text[0] if text else type(exc).__name__)


def retrying(service: str, url: str, fn: Callable[[], T], hint: str) -> T:
    """Call `fn`, retrying transient failures with backoff (0.5 s, 1 s, 2 s, ... up to 8 s).

    Raises `ServiceUnavailable` naming `service` and `url` (masked) when every attempt failed transiently;
    any other error propagates unchanged on the first attempt.
    """

    register_url(url)  # its password is masked in every message from here on, in whatever form it turns up

    def before_sleep(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception()
        log.warning(
            "%s at %s: %s; retrying in %.1f s (attempt %d of %d)",
            service, mask_url(url), _first_line(exc), state.next_action.sleep, state.attempt_number,
            attempts(),
        )  # fmt: skip

    retryer = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(attempts()),
        wait=tenacity.wait_exponential(multiplier=0.5, max=8),
        retry=tenacity.retry_if_exception(is_transient),
        before_sleep=before_sleep,
        reraise=True,
    )
    try:
        return retryer(fn)
    except Exception as e:
        if not is_transient(e):
            raise
        raise ServiceUnavailable(
            f"{service} at {mask_url(url)} is unreachable after {attempts()} attempts: {_first_line(e)}. "
            f"{hint}"
        ) from e
