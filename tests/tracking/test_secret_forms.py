"""Passwords in every form a URL can carry them, and the key variable a spec names, stay out of retry
messages, failure messages and logs."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from featureatlas.tasks.tracking.catalog import Catalog
from featureatlas.tasks.tracking.mlflow_runs import Tracker
from featureatlas.tasks.tracking.retry import ServiceUnavailable
from featureatlas.tasks.tracking.secrets import (
    SECRET_ENV_LIST,
    install_log_masking,
    mask_text,
    register_config_secrets,
)
from tests.pg import free_port

FORMS = {
    "slash": ("lab:pa/ss-W0rd@127.0.0.1:{port}/db", "pa/ss-W0rd"),
    "space": ("lab:pa ss-W0rd@127.0.0.1:{port}/db", "pa ss-W0rd"),
    "query": ("lab@127.0.0.1:{port}/db?password=qu3ry-S3cret&sslmode=disable", "qu3ry-S3cret"),
}


@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("opener", ["catalog", "tracker"])
def test_each_password_form_is_masked_in_retries_and_failures(form, opener, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("FEATUREATLAS_RETRY_ATTEMPTS", "2")
    install_log_masking()
    rest, password = FORMS[form]
    url = "postgresql+psycopg://" + rest.format(port=free_port())
    with caplog.at_level(logging.WARNING), pytest.raises(ServiceUnavailable) as e:
        Catalog(url) if opener == "catalog" else Tracker(url, "featureatlas", tmp_path)
    retries = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert retries, "each retry is logged"
    for text in [str(e.value), *retries]:
        assert "127.0.0.1" in text and "***" in text
        assert password not in text and password.split("/")[-1] not in text and "ss-W0rd" not in text


def test_a_spec_key_variable_is_masked_whatever_its_name(monkeypatch):
    value = "lab-llm-0123456789abcdef"
    monkeypatch.setenv("LAB_LLM", value)  # a name that does not look secret
    monkeypatch.setenv(SECRET_ENV_LIST, "")
    assert mask_text(f"calling with {value}") == f"calling with {value}"
    register_config_secrets({"label": {"llm": {"backend": "openai", "api_key_env": "LAB_LLM"}}})
    assert mask_text(f"calling with {value}") == "calling with ***"
    # processes started from here on (Dask workers, the labeling of a scheduled run) mask it as well
    code = "import sys\nfrom featureatlas.tasks.tracking import secrets as s\nprint(s.mask_text(sys.argv[1]))"
    out = subprocess.run([sys.executable, "-c", code, f"key {value}"], capture_output=True, text=True,
                         env=os.environ.copy(), check=True).stdout  # fmt: skip
    assert out.strip() == "key ***"
