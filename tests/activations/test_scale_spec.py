"""The shipped real-scale spec (flows/pipelines/scale.yaml) validates and plans without loading the model:
a 1B-shaped model folder whose weights are not even loadable, 10^8 tokens, streaming, bfloat16."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from typer.testing import CliRunner

from featureatlas.flows.cli import app
from featureatlas.schemas.spec import load_spec

SPEC = Path(__file__).resolve().parents[2] / "flows" / "pipelines" / "scale.yaml"
LLAMA_1B = Path(__file__).resolve().parents[2] / "benchmarks" / "configs" / "llama_1b.json"


def test_the_scale_spec_streams_in_bfloat16():
    spec = load_spec(SPEC)
    assert spec.cache.store is False and spec.cache.dtype == "bfloat16"  # 'auto' took the model's dtype
    assert spec.corpus.max_tokens == 10**8 and spec.model.dtype == "bfloat16"


def test_the_scale_spec_plans_without_loading_the_model(tmp_path, home, monkeypatch):  # noqa: ARG001
    import featureatlas.tasks.common.models as models

    def refuse(*_args, **_kwargs):
        raise AssertionError("planning must not load the model")

    monkeypatch.setattr(models, "_from_pretrained", refuse)
    model = tmp_path / "llama-1b"
    model.mkdir()
    (model / "config.json").write_text(LLAMA_1B.read_text())
    (model / "model.safetensors").write_bytes(b"not a checkpoint: loading it would fail")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "part-0.txt").write_text("a corpus file\n")
    raw = yaml.safe_load(SPEC.read_text())
    raw["model"]["path"] = str(model)
    raw["corpus"]["sources"] = [str(corpus)]
    path = tmp_path / "scale.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["run", str(path), "--plan", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert [s["kind"] for s in plan] == [
        "model",
        "corpus",
        "activation_cache",
        "dictionary",
        "evaluation",
        "labeling",
    ]


def test_cache_dtype_auto_follows_the_model_unless_set():
    from featureatlas.schemas.spec import CacheSpec, ModelSpec, PipelineSpec

    base = {"hookpoints": ["h"], "dictionaries": [{"method": "topk", "d_sae": 8, "k": 2}]}
    bf16 = ModelSpec(path="m", dtype="bfloat16")
    assert PipelineSpec(model=bf16, cache=CacheSpec(), **base).cache.dtype == "bfloat16"
    assert PipelineSpec.model_validate({"model": {"path": "m"}, **base}).cache.dtype == "float32"
    kept = {"model": {"path": "m", "dtype": "bfloat16"}, "cache": {"dtype": "float32"}, **base}
    assert PipelineSpec.model_validate(kept).cache.dtype == "float32"
