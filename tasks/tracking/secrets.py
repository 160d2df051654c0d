"""Keep secrets out of MLflow params, logs and the catalog.

A secret is a password in a URL (`postgresql+psycopg://user:PASSWORD@host/db`, `https://user:PASSWORD@...`),
the string value of a config key named like a credential (`token`, `hf_token`, `api_key`, `password`,
`secret`), or the value of an environment variable named like one (`HF_TOKEN`, `OPENAI_API_KEY`,
`PGPASSWORD`), wherever that value turns up in text. Masking replaces each with `***`.
`install_log_masking` puts the same masking into every log record, whichever library logs it.
"""

from __future__ import annotations

import logging
import os
import re

MASK = "***"
_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)(?P<pw>[^@\s/]+)(?P<at>@)")
_SECRET_KEY = re.compile(
    r"(^|[_.-])(token|access[_-]?token|api[_-]?key|apikey|password|passwd|pwd|secret|credentials?)$", re.I
)
_SECRET_ENV = re.compile(r"(TOKEN|API_?KEY|PASSWORD|PASSWD|SECRET|CREDENTIALS?)$", re.I)
_MIN_SECRET_LEN = 6  # shorter env values ("1", "true") would mask ordinary words


def secret_key(key: str) -> bool:
    """Whether a config key names a credential (`hf_token`, `api_key`), not a count (`max_tokens`)."""
    return bool(_SECRET_KEY.search(key))


def _env_secrets() -> list[str]:
    values = [v for k, v in os.environ.items() if _SECRET_ENV.search(k) and len(v) >= _MIN_SECRET_LEN]
    return sorted(set(values), key=len, reverse=True)  # longest first: a secret containing another


def mask_url(url: str) -> str:
    """`scheme://user:PASSWORD@host/...` with the password replaced by `***`; other URLs unchanged."""
    return _URL_PASSWORD.sub(lambda m: f"{m['head']}{MASK}{m['at']}", url)


def mask_text(text: str) -> str:
    """Mask URL passwords and the values of secret environment variables in free text."""
    text = mask_url(text)
    for value in _env_secrets():
        if value in text:
            text = text.replace(value, MASK)
    return text


def mask_secrets(value, key: str = ""):
    """A copy of a JSON-like config with every secret masked (keys named like credentials, and text)."""
    if isinstance(value, dict):
        return {k: mask_secrets(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(mask_secrets(v, key) for v in value)
    if isinstance(value, str):
        return MASK if value and secret_key(key) else mask_text(value)
    return value


_installed = False


def install_log_masking() -> None:
    """Mask secrets in every log record from now on (idempotent): Prefect's, MLflow's and ours alike."""
    global _installed
    if _installed:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args, **kwargs) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a malformed record: leave it for logging to report
            return record
        masked = mask_text(message)
        if masked != message:
            record.msg, record.args = masked, ()
        return record

    logging.setLogRecordFactory(factory)
    _installed = True
