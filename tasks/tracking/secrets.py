"""Keep secrets out of MLflow params, logs and the catalog.

A secret is a password in a URL (`postgresql+psycopg://user:PASSWORD@host/db`, even with `/` or spaces in
it; `...?password=PASSWORD`), the string value of a config key named like a credential (`token`, `hf_token`,
`api_key`, `password`, `secret`), the value of an environment variable named like one (`HF_TOKEN`,
`OPENAI_API_KEY`, `PGPASSWORD`) or named by a spec (`label.llm.api_key_env`, whatever its name), and every
password of a URL that went through `register_url`, wherever that value turns up in text, in whatever form
(a psycopg error may quote it decoded). Masking replaces each with `***`. `install_log_masking` puts the same
masking into every log record, whichever library logs it.
"""

from __future__ import annotations

import logging
import os
import re
from urllib.parse import unquote, unquote_plus

MASK = "***"
# `user:` after the scheme, then everything up to the last `@` on the line before another URL begins: a
# password may hold `/`, `:` or spaces (drivers accept them unencoded), so it cannot stop at the first one;
# `host:5432/db` is a port, not a password, even when an `@` follows later on the line
_URL_PASSWORD = re.compile(
    r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)(?!\d{1,5}(?:[/\s]|$))"
    r"(?P<pw>(?:(?!\w+://)[^\n])+)(?P<at>@)(?=[\w\[])"
)
# `?password=...` or `&password=...` in a URL's query, and `password=...` in a libpq connection string
_QUERY_PASSWORD = re.compile(
    r"(?P<head>(?<![\w.-])(?:password|passwd|pwd|sslpassword|api_?key|access_token|secret)=)"
    r"(?P<pw>'[^'\n]*'|[^&\s#'\",;]+)",
    re.I,
)
SECRET_ENV_LIST = "FEATUREATLAS_SECRET_ENV"  # names of more variables to mask; child processes inherit it
_MIN_REGISTERED_LEN = 4  # a one-letter password would mask that letter everywhere
_registered: set[str] = set()
_SECRET_KEY = re.compile(
    r"(^|[_.-])(token|access[_-]?token|api[_-]?key|apikey|password|passwd|pwd|secret|credentials?)$", re.I
)
_SECRET_ENV = re.compile(r"(TOKEN|API_?KEY|PASSWORD|PASSWD|SECRET|CREDENTIALS?)$", re.I)
_MIN_SECRET_LEN = 6  # shorter env values ("1", "true") would mask ordinary words


def secret_key(key: str) -> bool:
    """Whether a config key names a credential (`hf_token`, `api_key`), not a count (`max_tokens`)."""
    return bool(_SECRET_KEY.search(key))


def register_secret_env(name: str) -> None:
    """Mask the value of environment variable `name` from now on, whatever its name, in this process and in
    the processes it starts (the name is added to FEATUREATLAS_SECRET_ENV, which they inherit)."""
    names = [n for n in os.environ.get(SECRET_ENV_LIST, "").split(",") if n]
    if name and name not in names:
        os.environ[SECRET_ENV_LIST] = ",".join([*names, name])


def register_config_secrets(config) -> None:
    """Register every variable a config names as holding a credential (`api_key_env: MY_VAR` and the like)."""
    if isinstance(config, dict):
        for key, value in config.items():
            if isinstance(value, str) and re.search(r"(key|token|password|secret)_env$", str(key), re.I):
                register_secret_env(value)
            else:
                register_config_secrets(value)
    elif isinstance(config, (list, tuple)):
        for value in config:
            register_config_secrets(value)


def _password_of(url: str) -> str | None:
    match = _URL_PASSWORD.search(url) or _QUERY_PASSWORD.search(url)
    return match["pw"].strip("'") if match else None


def register_url(url: str | None) -> None:
    """Mask the password of `url` wherever it turns up from now on, as written and percent-decoded."""
    pw = _password_of(url or "")
    if pw:
        _registered.update(v for v in {pw, unquote(pw), unquote_plus(pw)} if len(v) >= _MIN_REGISTERED_LEN)


def _env_secrets() -> list[str]:
    named = set(os.environ.get(SECRET_ENV_LIST, "").split(","))
    values = [
        v
        for k, v in os.environ.items()
        if (_SECRET_ENV.search(k) or k in named) and len(v) >= _MIN_SECRET_LEN
    ]
    return sorted(set(values) | _registered, key=len, reverse=True)  # longest first: a secret inside another


def mask_url(url: str) -> str:
    """`scheme://user:PASSWORD@host/...` and `?password=PASSWORD` with the password replaced by `***`, and any
    registered password wherever it stands; other URLs unchanged."""
    url = _URL_PASSWORD.sub(lambda m: f"{m['head']}{MASK}{m['at']}", url)
    url = _QUERY_PASSWORD.sub(lambda m: f"{m['head']}{MASK}", url)
    for value in sorted(_registered, key=len, reverse=True):
        url = url.replace(value, MASK)
    return url


def mask_text(text: str) -> str:
    """Mask URL passwords, registered passwords and the values of secret environment variables in text."""
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
