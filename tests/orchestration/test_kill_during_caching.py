"""Kill -9 a `featureatlas run` while it caches: nothing half-made is registered, and the re-run resumes to
the outputs of an uninterrupted run (the same cache bytes, the same dictionary weights). On SQLite and on
PostgreSQL: the killed process's open connections must leave no half-made row there either."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from featureatlas.schemas.settings import Settings
from featureatlas.schemas.spec import load_spec
from featureatlas.tasks.tracking.catalog import open_catalog
from tests.flows.test_pipeline import tiny_spec
from tests.pg import fresh_database_env

REPO = Path(__file__).parents[2]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_killed_pipeline_resumes_caching_and_matches_an_uninterrupted_run(
    tmp_path,
    backend,  # the killed process's catalog and MLflow store: SQLite files or PostgreSQL
    request,
    monkeypatch,
    prefect_harness,  # noqa: ARG001
):
    from prefect.settings import PREFECT_API_URL

    from featureatlas.flows.pipeline import pipeline_flow

    raw = tiny_spec(tmp_path, evaluate={"enabled": False}, label={"enabled": False})
    raw["cache"] = {"shard_tokens": 128, "batch_size": 2}
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(raw))
    spec = load_spec(spec_path)

    killed_home = tmp_path / "killed"
    env = os.environ | {
        "FEATUREATLAS_HOME": str(killed_home),
        "PREFECT_API_URL": PREFECT_API_URL.value(),  # the test's server: no temporary one to start
        "PYTHONPATH": str(REPO),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.orchestration.slow_run", str(spec_path)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    shards = killed_home / "artifacts" / "activation_cache"
    deadline = time.monotonic() + 300
    try:
        while len(list(shards.glob("*.partial/acts/*/*.safetensors"))) < 2:
            assert proc.poll() is None, f"the run ended before it was killed: {proc.stderr.read().decode()}"
            assert time.monotonic() < deadline, "the run wrote no shards in 300 s"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group: the CLI and anything it started
        proc.wait(30)

    # nothing half-made is registered: the model and corpus are, the cache only exists as its .partial
    settings = Settings(home=killed_home)
    assert open_catalog(settings.catalog).engine.dialect.name == backend
    assert sorted(k for k, _ in open_catalog(settings.catalog).list()) == ["corpus", "model"]
    (partial,) = shards.glob("*.partial")
    assert not (partial / "manifest.json").exists()
    assert not partial.with_name(partial.name.removesuffix(".partial")).exists()
    kept = {str(p.relative_to(partial)): p.stat().st_mtime_ns for p in partial.glob("acts/*/*.safetensors")}

    monkeypatch.setenv("FEATUREATLAS_HOME", str(tmp_path / "fresh"))
    with monkeypatch.context() as own:
        if backend == "postgresql":  # the reference run gets databases of its own, as its home does on SQLite
            for name, url in fresh_database_env(request.getfixturevalue("pg_cluster")).items():
                own.setenv(name, url)
        fresh = pipeline_flow(spec)
    monkeypatch.setenv("FEATUREATLAS_HOME", str(killed_home))
    resumed = pipeline_flow(spec)

    assert resumed.cache.id == fresh.cache.id and Path(resumed.cache.path) == shards / fresh.cache.id
    assert not partial.exists()
    assert _files(Path(resumed.cache.path)) == _files(Path(fresh.cache.path))
    # the shards the killed run finished were adopted, not computed again
    assert kept and {p: (Path(resumed.cache.path) / p).stat().st_mtime_ns for p in kept} == kept
    got = load_file(Path(resumed.dictionaries[0].dictionary.path) / "weights.safetensors")
    want = load_file(Path(fresh.dictionaries[0].dictionary.path) / "weights.safetensors")
    assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in want)
    kinds = sorted(k for k, _ in open_catalog(settings.catalog).list())
    assert kinds == ["activation_cache", "corpus", "dictionary", "model"]
