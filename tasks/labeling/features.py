"""The full feature table: top contexts, streamed statistics, logit effects, statistical labels and scores.

`build_feature_table` adds to the `top_activating_contexts` table (see `FEATURE_COLUMNS` for the new
columns): activation histogram, examples from activation quantile bins, nearest latents by decoder cosine,
co-occurring latents, the top promoted/suppressed tokens of the decoder direction, a statistical label with
its evidence, and its detection and (optional) embedding scores; with an `LLMLabeler`, LLM labels of the most
frequent latents, scored the same way. `labels` lists every label of a latent with its `label_source`
("stat", "llm:<backend>:<model>") and scores: `df.explode("labels").unnest("labels")` is the long table.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import polars as pl
import torch
from torch import Tensor, nn

from featureatlas.tasks.labeling.code_stream import CodeStream
from featureatlas.tasks.labeling.corpus import CacheRows, TensorRows, wanted_ngrams
from featureatlas.tasks.labeling.feature_stats import activation_statistics, decoder_neighbours, logit_effects
from featureatlas.tasks.labeling.llm_labels import LLMLabeler
from featureatlas.tasks.labeling.scoring import MiniLM, balanced_accuracy, embedding_scores
from featureatlas.tasks.labeling.stat_labeler import NgramCounts, matches, statistical_label
from featureatlas.tasks.labeling.top_contexts import _mark, _top_contexts, _validate

log = logging.getLogger(__name__)

__all__ = ["FEATURE_COLUMNS", "Unembedding", "build_feature_table", "feature_table"]

EXAMPLE = pl.Struct(
    {
        "quantile": pl.Int64,
        "context": pl.Int64,
        "position": pl.Int64,
        "activation": pl.Float64,
        "text": pl.String,
    }
)
NEIGHBOUR = pl.Struct({"latent": pl.Int64, "score": pl.Float64})
LOGIT = pl.Struct({"token": pl.String, "logit": pl.Float64})
LABEL = pl.Struct(
    {
        "label_source": pl.String,  # "stat" or "llm:<backend>:<model>"
        "label": pl.String,
        "detection_score": pl.Float64,
        "embedding_similarity": pl.Float64,
        "embedding_contrast": pl.Float64,
    }
)
FEATURE_COLUMNS = {
    "hist_counts": pl.List(pl.Int64),  # n_bins equal bins over [0, max_activation]
    "quantile_examples": pl.List(EXAMPLE),
    "decoder_neighbours": pl.List(NEIGHBOUR),  # score: cosine of decoder rows
    "cooccurring": pl.List(NEIGHBOUR),  # score: Jaccard index of the firing sets
    "promoted_tokens": pl.List(LOGIT),
    "suppressed_tokens": pl.List(LOGIT),
    "stat_label": pl.String,
    "stat_label_evidence": pl.String,  # JSON: n-grams with share, base rate, lift; promoted token
    "detection_score": pl.Float64,  # balanced accuracy of "a label n-gram ends at the marked token"
    "embedding_similarity": pl.Float64,  # mean MiniLM cosine(label, activating contexts); null past the
    # `embed_latents` most frequent labeled latents
    "embedding_contrast": pl.Float64,  # embedding_similarity minus the mean cosine with random contexts
    "labels": pl.List(LABEL),  # every label of the latent, statistical and LLM-written, with its scores
}


@dataclass
class Unembedding:
    """The model's final norm weight (None: no norm) and unembedding `W_U [vocab, d_in]`."""

    W_U: Tensor
    norm_weight: Tensor | None = None
    center: bool = False  # LayerNorm removes the mean; RMSNorm does not

    @classmethod
    def from_model(cls, model: nn.Module) -> Unembedding:
        base = getattr(model, "base_model", model)
        norm = next((getattr(base, n) for n in ("norm", "ln_f", "final_layernorm") if hasattr(base, n)), None)
        weight = getattr(norm, "weight", None)
        return cls(
            model.get_output_embeddings().weight.detach().cpu(),
            None if weight is None else weight.detach().cpu(),
            isinstance(norm, nn.LayerNorm),
        )


def build_feature_table(
    dictionary: nn.Module,
    acts,
    row_context: Tensor,
    row_position: Tensor,
    context_tokens: Tensor,
    token_strings: Callable[[list[int]], list[str]],
    counts: NgramCounts | None = None,
    *,
    batch_size: int = 4096,
    **kwargs,
) -> pl.DataFrame:
    """`acts`: a `[n, d_in]` tensor or a `ShardedActs` view; the rest as in `top_activating_contexts`
    (`counts`: the corpus n-gram counts, default counted from `context_tokens`). Keywords: `feature_table`'s.
    """
    _validate(acts, row_context, row_position, context_tokens, dictionary.d_in)
    if acts.shape[0] == 0:
        raise ValueError("acts has no rows; label on at least one activation row")

    def batches():
        return (acts[lo : lo + batch_size] for lo in range(0, acts.shape[0], batch_size))

    corpus = TensorRows(row_context, row_position, context_tokens)
    return feature_table(dictionary, batches, corpus, token_strings, counts, **kwargs)


def feature_table(
    dictionary: nn.Module,
    batches: Callable[[], Iterable[Tensor]],
    corpus: TensorRows | CacheRows,
    token_strings: Callable[[list[int]], list[str]],
    counts: NgramCounts | None = None,
    *,
    unembedding: Unembedding | None = None,
    embedder: MiniLM | None = None,
    llm: LLMLabeler | None = None,
    top_k: int = 10,
    window: int = 8,
    n_bins: int = 20,
    n_logits: int = 10,
    embed_latents: int = 256,
    embed_contexts: int = 6,
    spill_budget: int = 8 << 30,
) -> pl.DataFrame:
    """The feature table of the activation rows `batches()` yields (fresh each call, in row order), whose
    contexts `corpus` knows. `counts`: the corpus n-gram counts (default: `corpus.ngram_counts` of the
    n-grams the top contexts ask about).

    The dictionary encodes the rows once, on its own device: every later pass reads the firing codes there
    (`CodeStream`; past `spill_budget` bytes of them, or with 0, every pass encodes again). Only the
    per-latent tables and the few rows shown (top contexts, quantile examples, silent rows) come back to the
    CPU."""
    if top_k < 1 or window < 0:
        raise ValueError(f"need top_k >= 1, window >= 0; got {top_k}, {window}")
    param = next(iter(dictionary.parameters()), None)
    device, dtype = (None, None) if param is None else (param.device, param.dtype)
    with CodeStream(dictionary, batches, device=device, dtype=dtype, spill_budget=spill_budget) as codes:
        table = _top_contexts(codes, corpus, token_strings, top_k, window)
        max_act = torch.tensor(table["max_activation"].to_list()).clamp_min(0)
        stats = activation_statistics(dictionary, batches, max_act, n_bins=n_bins, codes=codes)
    d_sae = dictionary.d_sae
    with torch.no_grad():
        W_dec = dictionary.decoder_directions().detach().float()
    nb_idx, nb_cos = (t.cpu() for t in decoder_neighbours(W_dec))
    promoted = suppressed = None
    if unembedding is not None:
        up_i, up_v, dn_i, dn_v = logit_effects(
            W_dec, unembedding.W_U, unembedding.norm_weight, center=unembedding.center, k=n_logits
        )
        ids = sorted(set(up_i.flatten().tolist()) | set(dn_i.flatten().tolist()))
        names = dict(zip(ids, token_strings(ids)))
        promoted = [
            [{"token": names[t], "logit": v} for t, v in zip(i, vv)]
            for i, vv in zip(up_i.tolist(), up_v.tolist())
        ]
        suppressed = [
            [{"token": names[t], "logit": v} for t, v in zip(i, vv)]
            for i, vv in zip(dn_i.tolist(), dn_v.tolist())
        ]

    # Every (context, position) shown or scored: the top contexts, the quantile examples, the silent rows;
    # their windows fetched once (half-width at least 1: a label's bigram ends at the centre).
    tops = [[(c["context"], c["position"]) for c in cs] for cs in table["contexts"].to_list()]
    shown_rows = torch.cat([stats.sample_rows.flatten(), stats.random_rows.flatten()])
    shown_rows = torch.unique(shown_rows[shown_rows >= 0])
    row_ctx, row_pos = corpus.locate(shown_rows)
    place = dict(zip(shown_rows.tolist(), zip(row_ctx.tolist(), row_pos.tolist())))
    keys = sorted({*place.values(), *(cp for top in tops for cp in top)})
    half = max(window, 1)
    key_t = torch.tensor(keys, dtype=torch.int64).view(-1, 2)
    win = corpus.windows(key_t[:, 0], key_t[:, 1], half)
    at = {k: i for i, k in enumerate(keys)}
    if counts is None:
        top_keys = torch.tensor([at[cp] for top in tops for cp in top], dtype=torch.int64)
        counts = corpus.ngram_counts(wanted_ngrams(win[top_keys], half))
    win_np = win.numpy()  # indexed per element below: numpy's scalar indexing is cheap
    texts = _window_texts(win_np, [at[place[r]] for r in place], half, window, token_strings)
    texts = dict(zip(place, texts))

    rows_out, pos_texts, neg_texts = [], [], []
    sample_rows, sample_vals = stats.sample_rows.tolist(), stats.sample_vals.tolist()
    for latent in range(d_sae):
        top = tops[latent]
        top_promoted = up_i[latent, :1].tolist() if unembedding is not None else []
        lab = statistical_label(
            [(at[cp], half) for cp in top], win_np, counts, token_strings, promoted=top_promoted
        )
        examples, pos_rows = [], []
        for q, (rs, vs) in enumerate(zip(sample_rows[latent], sample_vals[latent])):
            for r, v in zip(rs, vs):
                if r >= 0:
                    ctx, pos = place[r]
                    examples.append(
                        {"quantile": q, "context": ctx, "position": pos, "activation": v, "text": texts[r]}
                    )
                    pos_rows.append(r)
        top_set = set(top)
        held_out = [r for r in pos_rows if place[r] not in top_set] or pos_rows
        neg_rows = [r for r in stats.random_rows[latent].tolist() if r >= 0]
        detection = None
        if lab.items:
            hit = [matches(lab.items, win_np, at[place[r]], half) for r in held_out]
            miss = [matches(lab.items, win_np, at[place[r]], half) for r in neg_rows]
            detection = balanced_accuracy(hit, miss)
        pos_texts.append([texts[r] for r in held_out])
        neg_texts.append([texts[r] for r in neg_rows])
        rows_out.append(
            {
                "hist_counts": [int(x) for x in stats.hist[latent].tolist()],
                "quantile_examples": examples,
                "decoder_neighbours": [
                    {"latent": i, "score": c}
                    for i, c in zip(nb_idx[latent].tolist(), nb_cos[latent].tolist())
                ],
                "cooccurring": [
                    {"latent": i, "score": j}
                    for i, j in zip(stats.cooc_latents[latent].tolist(), stats.cooc_jaccard[latent].tolist())
                    if j > 0
                ],
                "promoted_tokens": promoted[latent] if promoted else [],
                "suppressed_tokens": suppressed[latent] if suppressed else [],
                "stat_label": lab.label,
                "stat_label_evidence": lab.evidence,
                "detection_score": detection,
                "embedding_similarity": None,
                "embedding_contrast": None,
            }
        )
    if embedder is not None:
        # MiniLM on CPU embeds ~100 texts/s: score the most frequent labeled latents, a few contexts each
        labelled = [i for i, r in enumerate(rows_out) if r["stat_label"]]
        labelled = sorted(labelled, key=lambda i: -table["frequency"][i])[:embed_latents]
        scores = embedding_scores(
            embedder,
            [rows_out[i]["stat_label"] for i in labelled],
            [pos_texts[i][:embed_contexts] for i in labelled],
            [neg_texts[i][:embed_contexts] for i in labelled],
        )
        for i, (sim, contrast) in zip(labelled, scores):
            rows_out[i]["embedding_similarity"], rows_out[i]["embedding_contrast"] = sim, contrast
    for r in rows_out:
        r["labels"] = [_label_entry("stat", r["stat_label"], r)] if r["stat_label"] else []
    if llm is not None:
        _add_llm_labels(llm, table, rows_out, promoted, pos_texts, neg_texts, embedder, embed_contexts)
    extra = pl.DataFrame(rows_out, schema=pl.Schema(FEATURE_COLUMNS))
    return pl.concat([table, extra], how="horizontal")


def _label_entry(source: str, label: str, scores: dict) -> dict:
    keys = ("detection_score", "embedding_similarity", "embedding_contrast")
    return {"label_source": source, "label": label, **{k: scores.get(k) for k in keys}}


def _add_llm_labels(llm, table, rows_out, promoted, pos_texts, neg_texts, embedder, embed_contexts) -> None:
    """LLM labels, detection and embedding scores for the `llm.max_features` most frequent fired latents."""
    freq = table["frequency"].to_list()
    chosen = sorted((i for i in range(len(freq)) if freq[i] > 0), key=lambda i: -freq[i])[: llm.max_features]
    labels = llm.label(
        [[c["text"] for c in table["contexts"][i]] for i in chosen],
        [[t["token"] for t in promoted[i]] if promoted else [] for i in chosen],
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
    for i, label, det, (sim, contrast) in zip(chosen, labels, detection, embedded):
        if label:
            scores = {"detection_score": det, "embedding_similarity": sim, "embedding_contrast": contrast}
            rows_out[i]["labels"].append(_label_entry(llm.source, label, scores))
    log.info("LLM-labeled %d of %d latents (%s)", sum(map(bool, labels)), len(chosen), llm.source)


def _window_texts(win, index: list[int], half: int, window: int, token_strings) -> list[str]:
    """Marked text windows (as in the top contexts) of the fetched windows `win[index]` (half-width
    `half` >= `window`), token strings fetched once."""
    spans = []
    for ids in win[index, half - window : half + window + 1].tolist():
        before = [t for t in ids[:window] if t >= 0]
        after = [t for t in ids[window + 1 :] if t >= 0]
        spans.append(([*before, ids[window], *after], len(before)))
    distinct = sorted({t for ids, _ in spans for t in ids})
    display = dict(zip(distinct, token_strings(distinct))) if distinct else {}
    return [_mark([display[t] for t in ids], c) for ids, c in spans]
