"""LLM labels in the feature table, from a loopback OpenAI-compatible server: the planted " cat" latent is
labeled "cat" with detection 1, the labels carry their source, and timeouts and 503s are retried."""

from __future__ import annotations

import logging

import pytest

from featureatlas.schemas.spec import LLMLabelSpec
from featureatlas.tasks.labeling.features import build_feature_table
from featureatlas.tasks.labeling.llm_labels import build_labeler
from featureatlas.tasks.labeling.stat_labeler import count_ngrams
from tests.labeling import llm_server
from tests.labeling.test_features import planted
from tests.labeling.test_top_contexts import token_strings

SECRET = "sk-test-never-log-me-42"


@pytest.fixture
def llm():
    state, httpd = llm_server.start()
    yield state
    httpd.shutdown()
    httpd.server_close()


def test_planted_feature_gets_an_llm_label_scored_by_detection(llm, monkeypatch, caplog):
    monkeypatch.setenv("FA_TEST_LLM_KEY", SECRET)
    spec = LLMLabelSpec(
        backend="openai",
        url=llm.url,
        model="tiny-rules",
        api_key_env="FA_TEST_LLM_KEY",
        max_features=12,
        detection_contexts=4,
        prompt_price_per_1m=2.0,
        completion_price_per_1m=10.0,
    )
    labeler = build_labeler(spec)
    dictionary, acts, rc, rp, tokens = planted()
    with caplog.at_level(logging.DEBUG):
        df = build_feature_table(
            dictionary, acts, rc, rp, tokens, token_strings, count_ngrams(tokens), llm=labeler, top_k=5
        )
    labels = df.select("latent", "labels").explode("labels").unnest("labels").drop_nulls("label_source")
    llm_rows = labels.filter(labels["label_source"] == "llm:openai:tiny-rules")
    # latent 1 never fires, so 11 of the 12 latents are LLM-labeled; each also keeps its statistical label
    assert sorted(llm_rows["latent"].to_list()) == [0, *range(2, 12)]
    assert set(labels.filter(labels["label_source"] == "stat")["latent"]) == set(
        df.filter(df["stat_label"].is_not_null())["latent"]
    )
    cat = llm_rows.filter(llm_rows["latent"] == 0).row(0, named=True)
    assert cat["label"] == "cat"
    # 4 held-out " cat" rows answered yes, 4 silent random rows answered no
    assert cat["detection_score"] == pytest.approx(1.0)
    others = llm_rows.filter(llm_rows["latent"] != 0)["detection_score"].drop_nulls()
    assert others.mean() < 0.8  # random latents: their commonest top token does not predict where they fire

    # one label request per latent and 8 detection requests per label, all with the key from the environment
    usage = labeler.usage()
    assert usage["llm_requests"] == 11 + 11 * 8 == len(llm.seen)
    assert usage["llm_completion_tokens"] == 2 * len(llm.seen)
    assert usage["llm_cost"] == pytest.approx(
        (usage["llm_prompt_tokens"] * 2.0 + usage["llm_completion_tokens"] * 10.0) / 1e6
    )
    assert {s["auth"] for s in llm.seen} == {f"Bearer {SECRET}"}
    assert {s["path"] for s in llm.seen} == {"/v1/chat/completions"}
    assert SECRET not in caplog.text and SECRET not in repr(labeler)


def test_timeouts_and_server_errors_are_retried_with_backoff(llm, caplog):
    llm.fail_first, llm.slow_first, llm.slow_s = 2, 1, 2.0
    spec = LLMLabelSpec(
        backend="openai", url=llm.url, model="m", timeout_s=0.5, retries=3, batch_size=1, max_features=1
    )
    labeler = build_labeler(spec)
    labeler.backend.backoff_s = 0.05
    with caplog.at_level(logging.WARNING):
        assert labeler.label([["the «cat» sat"]], [[]]) == ["cat"]
    # 503, 503, then a timeout, then the answer; the waits double: 0.05, 0.10, 0.20 s
    assert len(llm.seen) == 4
    assert "(HTTP 503); retry 1 in 0.05 s" in caplog.text
    assert "(HTTP 503); retry 2 in 0.10 s" in caplog.text
    assert "retry 3 in 0.20 s" in caplog.text and "Timeout" in caplog.text
    assert labeler.usage()["llm_requests"] == 1  # only the answered request counts


def test_unreachable_endpoint_fails_with_the_url():
    spec = LLMLabelSpec(backend="openai", url="http://127.0.0.1:9/v1", model="m", retries=1, timeout_s=1)
    labeler = build_labeler(spec)
    labeler.backend.backoff_s = 0.01
    with pytest.raises(RuntimeError, match=r"127\.0\.0\.1:9/v1/chat/completions unreachable after 2 attempt"):
        labeler.label([["a «b»"]], [[]])


def test_spec_refuses_an_openai_backend_without_url_or_model():
    with pytest.raises(ValueError, match="needs `url`"):
        LLMLabelSpec(backend="openai", model="m")
    with pytest.raises(ValueError, match="`url` is for backend: openai"):
        LLMLabelSpec(url="http://x")
