"""The artifact root as a URL: file:// runs end to end; other schemes are refused with what is supported."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from featureatlas.schemas.settings import Settings, artifact_root_path
from featureatlas.schemas.spec import parse_spec
from featureatlas.tasks.tracking.catalog import open_catalog
from tests.flows.test_pipeline import tiny_spec


def test_artifact_root_urls_resolve_to_local_folders(tmp_path):
    assert artifact_root_path("file:///srv/atlas/artifacts") == Path("/srv/atlas/artifacts")
    assert artifact_root_path("file://localhost/srv/a%20b") == Path("/srv/a b")
    assert artifact_root_path("relative/folder") == Path("relative/folder")
    settings = Settings(home=tmp_path / "home", artifact_root=(tmp_path / "elsewhere").as_uri())
    assert settings.artifacts_dir == tmp_path / "elsewhere"
    assert Settings(home=tmp_path / "home").artifacts_dir == tmp_path / "home" / "artifacts"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("s3://bucket/atlas", "scheme 's3' is not supported yet; supported: a local path or file://"),
        ("gs://bucket/atlas", "filesystem mount"),
        ("file://fileserver/share", "not host 'fileserver'"),
    ],
)
def test_unsupported_artifact_roots_are_refused_with_the_fix(tmp_path, url, message):
    with pytest.raises(ValidationError, match=message):
        Settings(home=tmp_path, artifact_root=url)


def test_flow_writes_and_reuses_artifacts_under_a_file_url(tmp_path, monkeypatch, prefect_harness):  # noqa: ARG001
    from featureatlas.flows.pipeline import pipeline_flow

    root = tmp_path / "artifact store"  # a space: the URL is percent-encoded
    monkeypatch.setenv("FEATUREATLAS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FEATUREATLAS_ARTIFACT_ROOT", root.as_uri())
    assert "%20" in root.as_uri()
    spec = parse_spec(tiny_spec(tmp_path, evaluate={"enabled": False}, label={"enabled": False}))
    first = pipeline_flow(spec)
    refs = [first.model, first.corpus, first.cache, first.dictionaries[0].dictionary]
    for ref in refs:
        assert Path(ref.path).parent.parent == root and Path(ref.path).is_dir()
    assert (Path(first.dictionaries[0].dictionary.path) / "weights.safetensors").is_file()
    assert not (tmp_path / "home" / "artifacts").exists()
    catalog = open_catalog(Settings().catalog)
    assert {Path(r.uri).parent.parent for _, r in catalog.list()} == {root}
    second = pipeline_flow(spec)
    assert second.dictionaries[0].dictionary.reused
    assert second.dictionaries[0].dictionary.path == first.dictionaries[0].dictionary.path
