"""`run --plan` (and `run`) refuse what cannot work before any stage runs: missing paths, a held-out share
too small for one context, an unreadable model config, unknown hookpoints, a stage that cannot fit memory."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from featureatlas.flows.cli import app
from featureatlas.schemas.spec import parse_spec
from featureatlas.tasks.common.memory import check_fits, estimate
from featureatlas.tasks.common.preflight import PreflightError, model_facts
from featureatlas.tasks.dictionary.task import sweep_groups
from featureatlas.tasks.tracking.catalog import open_catalog
from tests.flows.test_pipeline import tiny_spec

runner = CliRunner()


def write(tmp_path, **overrides):
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(tiny_spec(tmp_path, **overrides)))
    return path


def plan(path, *extra):
    return runner.invoke(app, ["run", str(path), "--plan", *extra])


def test_plan_refuses_a_heldout_share_smaller_than_a_context(tmp_path, home):  # noqa: ARG001
    corpus = tiny_spec(tmp_path)["corpus"] | {"max_tokens": 256, "heldout_fraction": 0.02}
    result = plan(write(tmp_path, corpus=corpus))
    assert result.exit_code == 2, result.output
    assert "held-out share of the token budget is 5 tokens" in result.output
    assert "raise corpus.max_tokens or corpus.heldout_fraction" in result.output
    no_eval = plan(write(tmp_path, corpus=corpus, evaluate={"enabled": False}))
    assert no_eval.exit_code == 0, no_eval.output  # nothing reads held-out tokens then


def test_missing_corpus_file_is_refused_before_the_model_is_touched(tmp_path, home):  # noqa: ARG001
    corpus = tiny_spec(tmp_path)["corpus"] | {"sources": [str(tmp_path / "gone.jsonl")]}
    result = plan(write(tmp_path, corpus=corpus))
    assert result.exit_code == 2
    assert f"corpus file '{tmp_path / 'gone.jsonl'}' does not exist" in result.output


def test_unknown_hookpoint_and_unreadable_config_are_refused(tmp_path, home):  # noqa: ARG001
    result = plan(write(tmp_path, hookpoints=["model.layers.7"]))
    assert result.exit_code == 2
    assert "hookpoints: hookpoint 'model.layers.7' not found in LlamaForCausalLM" in result.output
    result = plan(write(tmp_path, hookpoints=["resid_post.5"]))
    assert result.exit_code == 2 and "has 3 blocks" in result.output
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    result = plan(write(tmp_path, model={"path": str(broken)}))
    assert result.exit_code == 2
    assert "transformers cannot read its config" in result.output


def test_oversized_d_sae_is_refused_by_plan_and_by_run_before_any_stage(tmp_path, home):
    dictionaries = [{"method": "topk", "d_sae": 10**12, "k": 4, "batch_size": 256}]
    path = write(tmp_path, dictionaries=dictionaries)
    result = plan(path)
    assert result.exit_code == 2, result.output
    assert "train_dictionary[topk d_sae=1000000000000, model.layers.1] needs about" in result.output
    assert "lower d_sae or batch_size" in result.output
    ran = runner.invoke(app, ["run", str(path)])
    assert ran.exit_code == 2 and "lower d_sae" in ran.output
    assert open_catalog(home.catalog).list() == []  # no stage ran: not even the model was registered


def test_plan_labels_sweep_members_and_estimates_memory(tmp_path, home):  # noqa: ARG001
    sweep = [{"method": "topk", "d_sae": 64, "k": 4}, {"method": "topk", "d_sae": 128, "k": 8}]
    result = plan(write(tmp_path, dictionaries=sweep), "--json")
    assert result.exit_code == 0, result.output
    stages = json.loads(result.stdout)
    trains = [s["stage"] for s in stages if s["kind"] == "dictionary"]
    assert trains == [
        "train_dictionary[topk d_sae=64 k=4, model.layers.1]",
        "train_dictionary[topk d_sae=128 k=8, model.layers.1]",
    ]
    by_stage = {s["stage"]: s for s in stages}
    assert all(s["device"] == "cpu" for s in stages if s["memory_bytes"] is not None)
    assert by_stage["register_model"]["memory_bytes"] > 0
    ev = [s["memory_bytes"] for s in stages if s["kind"] == "evaluation"]
    assert ev[1] > ev[0]  # the larger dictionary needs more


def test_memory_estimate_parts_and_refusal(tmp_path):
    spec = parse_spec(
        tiny_spec(tmp_path, dictionaries=[{"method": "topk", "d_sae": 1000, "k": 4, "batch_size": 10}])
    )
    facts = model_facts(spec.model, spec.model.path, spec.hookpoints)
    assert facts.widths == {"model.layers.1": 32} and facts.vocab_size == 320
    estimates = estimate(spec, facts, sweep_groups(spec.dictionary_jobs()))
    train = next(e for e in estimates if e.key[0] == "train")
    # (2 * 32 * 1000 + 1000 + 32) parameters x 4 bytes x 4 copies (weights, grads, two Adam moments)
    assert train.parts["dictionaries"] == (2 * 32 * 1000 + 1000 + 32) * 4 * 4
    assert train.parts["batch"] == 10 * (4 * 1000 + 4 * 32) * 4
    check_fits(estimates, available=lambda _device: 10**12)
    with pytest.raises(
        PreflightError, match=r"train_dictionary.*needs about .* but 1\.0 KiB is free; lower d_sae"
    ):
        check_fits([e for e in estimates if e.key[0] == "train"], available=lambda _device: 1024)
