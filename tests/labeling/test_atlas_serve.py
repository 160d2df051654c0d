"""`featureatlas dashboard` on a real pipeline run: the static index across the run's dictionaries, and
`--serve` with the model loaded, whose "try it" answers the latent's activation on every token of a typed
text (checked against a forward pass of our own) and shows it in headless Chromium."""

from __future__ import annotations

import json
import re
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from featureatlas.tasks.common.models import load_model_ref
from featureatlas.tasks.dictionary import load_dictionary
from featureatlas.tasks.labeling.atlas_set import resolve_atlases
from featureatlas.tasks.labeling.serve import TryIt, make_server, server_url
from featureatlas.tasks.tracking.catalog import open_catalog
from tests.tracking.browser import chromium, keep_screenshot, needs_chromium
from tests.tracking.lineage_run import run_tiny_pipeline

pytestmark = pytest.mark.slow
TEXT = "the cat sat on the mat.\nThe dog"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, prefect_harness):  # noqa: ARG001
    return run_tiny_pipeline(tmp_path_factory.mktemp("home"), tmp_path_factory.mktemp("work"))


@pytest.fixture(scope="module")
def served(tiny_run):
    settings, result = tiny_run
    atlases = resolve_atlases(open_catalog(settings.catalog), settings.home_dir, result.mlflow_run_id)
    server = make_server(atlases, TryIt(atlases.entries), 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server_url(server), atlases
    server.shutdown()
    server.server_close()


def _expected(result, text: str) -> tuple[list[int], torch.Tensor]:
    """Token ids and every latent's code on them, from a forward hook of our own on the hookpoint."""
    d, m = result.dictionaries[0].dictionary, result.cache.model
    loaded = load_model_ref(m.source, m.spec, m.path, m.converted)
    ids = loaded.tokenizer(text, return_tensors="pt")["input_ids"]
    seen = {}
    module = dict(loaded.model.named_modules())[d.hookpoint]
    handle = module.register_forward_hook(
        lambda _m, _i, out: seen.setdefault("x", out[0] if isinstance(out, tuple) else out)
    )
    with torch.no_grad():
        loaded.model(ids)
    handle.remove()
    codes = load_dictionary(d.path).encode(seen["x"][0].float())
    return ids[0].tolist(), codes


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"{url}api/activations", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_static_run_index_links_every_feature(tiny_run, monkeypatch):
    settings, result = tiny_run
    from featureatlas.flows.cli import app

    monkeypatch.setenv("FEATUREATLAS_HOME", str(settings.home_dir))
    out = CliRunner().invoke(app, ["dashboard"])  # no id: the newest pipeline run with an atlas
    assert out.exit_code == 0, out.output
    index = Path(out.output.strip().removeprefix("file://"))
    assert index == settings.home_dir / "atlas" / result.mlflow_run_id / "index.html"
    data = json.loads(re.search(r'id="data">(.*?)</script>', index.read_text()).group(1))
    d = result.dictionaries[0]
    assert len(data) == d.dictionary.d_sae and {r["dictionary"] for r in data} == {d.dictionary.id}
    assert all((index.parent / r["href"]).resolve().is_file() for r in data)
    bad = CliRunner().invoke(app, ["dashboard", "dict-000000000000"])
    assert bad.exit_code == 1 and "no labeling of 'dict-000000000000'" in bad.output


def test_try_it_answers_the_latents_activation_per_token(tiny_run, served):
    _, result = tiny_run
    url, atlases = served
    d = result.dictionaries[0].dictionary
    with urllib.request.urlopen(f"{url}api/info") as r:
        assert json.loads(r.read()) == {"dictionaries": [d.id]}
    ids, codes = _expected(result, TEXT)
    latent = int(codes[1:].max(dim=0).values.argmax())  # the latent firing most on this text
    status, got = _post(url, {"dictionary": d.id, "latent": latent, "text": TEXT})
    assert status == 200 and len(got["tokens"]) == len(ids)
    assert got["activations"][0] is None  # the first token: left out of the cache, as in labeling
    assert got["activations"][1:] == pytest.approx(codes[1:, latent].tolist(), abs=1e-5)
    assert max(got["activations"][1:]) > 0
    status, got = _post(url, {"dictionary": d.id, "latent": d.d_sae, "text": TEXT})
    assert status == 400 and f"latents 0..{d.d_sae - 1}" in got["error"]
    status, got = _post(url, {"dictionary": d.id, "text": TEXT})
    assert status == 400 and "latent" in got["error"]
    # only the atlas folders are served
    host = url.removeprefix("http://").rstrip("/")
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(f"http://{host}/d/{d.id}/../features.parquet")


@needs_chromium
def test_try_it_box_in_headless_chromium(tiny_run, served, tmp_path):
    _, result = tiny_run
    url, _ = served
    d = result.dictionaries[0].dictionary
    ids, codes = _expected(result, TEXT)
    latent = int(codes[1:].max(dim=0).values.argmax())
    page = f"{url}d/{d.id}/features/{latent}.html#try={urllib.parse.quote(TEXT)}"
    dom = chromium(["--dump-dom", page], tmp_path / "profile", budget_ms=10000)
    box = re.search(r'<section id="tryit"[^>]*>', dom).group(0)
    assert "hidden" not in box  # served with the model: the box shows
    shown = re.search(r'<p id="tryout" class="ctx">(.*?)</p>', dom, re.S).group(1)
    assert shown.count('class="tok"') == len(ids) - 1 and "max activation here" in shown
    dom = chromium(["--dump-dom", url], tmp_path / "profile", budget_ms=5000)
    assert f'href="d/{d.id}/features/{latent}.html"' in dom
    shot = tmp_path / "atlas_try_it.png"
    chromium([f"--screenshot={shot}", "--window-size=1200,1000", page], tmp_path / "profile", 10000)
    assert shot.stat().st_size > 10_000
    keep_screenshot(shot)
