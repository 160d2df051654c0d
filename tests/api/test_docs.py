"""The docs site builds in strict mode (every link and anchor resolves), with the spec reference generated
from the pydantic models and the API reference from the docstrings."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import featureatlas as fa
from featureatlas.schemas.methods import DictionaryConfig
from featureatlas.schemas.spec import PipelineSpec

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    # `python -m mkdocs`, not the `mkdocs` script: see docs/mkdocs.yml
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", "docs/mkdocs.yml", "-d", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return out


def test_site_builds_with_every_page(site):
    stages = [f"stages/{s}" for s in ("caching", "dictionaries", "evaluation", "labeling", "interactions")]
    for page in [*stages, "operations", "architecture", "benchmarks", "api", "reference/spec"]:
        assert (site / page / "index.html").is_file(), page
    assert (site / "notebook.ipynb").is_file()
    assert "| `topk` |" in (ROOT / "docs" / "pages" / "stages" / "dictionaries.md").read_text()


def test_spec_reference_is_generated_from_the_models(site):
    html = (site / "reference" / "spec" / "index.html").read_text()
    for name, field in PipelineSpec.model_fields.items():
        assert f"<code>{name}</code>" in html, name
    methods = DictionaryConfig.__origin__.__args__
    for cfg in methods:
        assert f'id="{cfg.__name__.lower()}"' in html, cfg.__name__
        for name in cfg.model_fields:
            assert f"<code>{name}</code>" in html
    assert PipelineSpec.model_fields["hookpoints"].description.split(",")[0] in html


def test_api_reference_comes_from_the_docstrings(site):
    html = (site / "api" / "index.html").read_text()
    for name in fa.__all__:
        assert re.search(rf'id="featureatlas\.[a-z_]+\.{name}"', html), name
    first_line = fa.catalog.__doc__.splitlines()[0]
    assert first_line.split("(")[0] in html


def test_docs_speak_of_the_project_only():
    pages = [ROOT / "README.md", *(ROOT / "docs" / "pages").rglob("*.md")]
    for page in pages:
        text = page.read_text().lower()
        for phrase in ("this session", "the issue", "issue's", "this run is"):
            assert phrase not in text, (page.name, phrase)
