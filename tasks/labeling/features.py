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

from featureatlas.tasks.common.threads import intra_op_threads
from featureatlas.tasks.labeling.code_stream import CodeStream
from featureatlas.tasks.labeling.columns import marked_windows, per_latent, series
from featureatlas.tasks.labeling.corpus import CacheRows, TensorRows, wanted_ngrams
from featureatlas.tasks.labeling.detection import detection_scores, scored_rows, scored_texts
from featureatlas.tasks.labeling.feature_stats import activation_statistics, decoder_neighbours, logit_effects
from featureatlas.tasks.labeling.llm_labels import LLMLabeler, llm_label_entries
from featureatlas.tasks.labeling.scoring import MiniLM, embedding_scores
from featureatlas.tasks.labeling.stat_labeler import NgramCounts, statistical_label
from featureatlas.tasks.labeling.top_contexts import _top_contexts, _validate

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
LABEL_THREADS = 1  # intra-op threads of the label stage's work other than encoding


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
    # the encode keeps the caller's intra-op threads; the rest runs on `LABEL_THREADS` (see `code_stream`)
    threads = torch.get_num_threads()
    with intra_op_threads(LABEL_THREADS):
        return _feature_table(
            dictionary,
            batches,
            corpus,
            token_strings,
            counts,
            unembedding=unembedding,
            embedder=embedder,
            llm=llm,
            top_k=top_k,
            window=window,
            n_bins=n_bins,
            n_logits=n_logits,
            embed_latents=embed_latents,
            embed_contexts=embed_contexts,
            spill_budget=spill_budget,
            encode_threads=threads,
        )


def _feature_table(
    dictionary,
    batches,
    corpus,
    token_strings,
    counts,
    *,
    unembedding,
    embedder,
    llm,
    top_k,
    window,
    n_bins,
    n_logits,
    embed_latents,
    embed_contexts,
    spill_budget,
    encode_threads,
) -> pl.DataFrame:
    param = next(iter(dictionary.parameters()), None)
    device, dtype = (None, None) if param is None else (param.device, param.dtype)
    stream = dict(device=device, dtype=dtype, spill_budget=spill_budget, encode_threads=encode_threads)
    with CodeStream(dictionary, batches, **stream) as codes:
        top = _top_contexts(codes, corpus, token_strings, top_k, window)
        max_act = top.max_activation.clamp_min(0)
        stats = activation_statistics(dictionary, batches, max_act, n_bins=n_bins, codes=codes)
    table, d_sae = top.table, dictionary.d_sae
    every = torch.arange(d_sae)
    with torch.no_grad():
        W_dec = dictionary.decoder_directions().detach().float()
    nb_idx, nb_cos = (t.cpu() for t in decoder_neighbours(W_dec))
    no_logits = pl.DataFrame(schema=LOGIT.to_schema())
    promoted = suppressed = per_latent(no_logits, every[:0], d_sae)
    up_i = None
    if unembedding is not None:
        up_i, up_v, dn_i, dn_v = logit_effects(
            W_dec, unembedding.W_U, unembedding.norm_weight, center=unembedding.center, k=n_logits
        )
        ids = torch.unique(torch.cat([up_i.flatten(), dn_i.flatten()]))
        names = pl.Series(token_strings(ids.tolist()), dtype=pl.String)

        def logit_lists(i: Tensor, v: Tensor) -> pl.Series:
            at = torch.searchsorted(ids, i.flatten()).numpy()
            flat = pl.DataFrame({"token": names.gather(at), "logit": series(v.flatten(), pl.Float64)})
            return per_latent(flat, every.repeat_interleave(i.shape[1]), d_sae)

        promoted, suppressed = logit_lists(up_i, up_v), logit_lists(dn_i, dn_v)

    # Every (context, position) shown or scored: the quantile examples, the silent rows, the top contexts;
    # their windows fetched once (half-width at least 1: a label's bigram ends at the centre).
    shown_rows = torch.cat([stats.sample_rows.flatten(), stats.random_rows.flatten()])
    shown_rows = torch.unique(shown_rows[shown_rows >= 0])
    row_ctx, row_pos = corpus.locate(shown_rows)
    key_ctx, key_pos = torch.cat([row_ctx, top.context]), torch.cat([row_pos, top.position])
    span = int(key_pos.max()) + 1 if len(key_pos) else 1
    keys, key_of = torch.unique(key_ctx * span + key_pos, return_inverse=True)  # (context, position) order
    half = max(window, 1)
    win = corpus.windows(keys // span, keys % span, half)
    row_key, top_key = key_of[: len(shown_rows)], key_of[len(shown_rows) :]
    if counts is None:
        counts = corpus.ngram_counts(wanted_ngrams(win[top_key], half))
    shown = marked_windows(win[row_key], half, window, token_strings)

    win_np = win.numpy()  # indexed per element by the labeler: numpy's scalar indexing is cheap
    n_top = torch.bincount(top.latent, minlength=d_sae)
    top_at, top_keys = (n_top.cumsum(0) - n_top).tolist(), top_key.tolist()
    labels = [
        statistical_label(
            [(k, half) for k in top_keys[top_at[latent] : top_at[latent] + int(n_top[latent])]],
            win_np,
            counts,
            token_strings,
            promoted=up_i[latent, :1].tolist() if up_i is not None else [],
        )
        for latent in range(d_sae)
    ]
    scored = scored_rows(stats, shown_rows, row_key, top.latent, top_key, d_sae)
    detection = detection_scores(labels, win, half, scored)

    # The quantile examples: every sampled row, by quantile bin, then slot.
    samples = stats.sample_rows.view(d_sae, -1)
    lat_s, slot_s = (samples >= 0).nonzero(as_tuple=True)
    at_s = torch.searchsorted(shown_rows, samples[lat_s, slot_s])
    examples = pl.DataFrame(
        {
            "quantile": (slot_s // stats.sample_rows.shape[2]).numpy(),
            "context": row_ctx[at_s].numpy(),
            "position": row_pos[at_s].numpy(),
            "activation": series(stats.sample_vals.view(d_sae, -1)[lat_s, slot_s], pl.Float64),
            "text": shown.text.gather(at_s.numpy()),
        },
        schema=EXAMPLE.to_schema(),
    )
    lat_c, col_c = (stats.cooc_jaccard > 0).nonzero(as_tuple=True)
    neighbours = pl.DataFrame(
        {"latent": nb_idx.flatten().numpy(), "score": series(nb_cos.flatten(), pl.Float64)}
    )
    cooccurring = pl.DataFrame(
        {
            "latent": stats.cooc_latents[lat_c, col_c].numpy(),
            "score": series(stats.cooc_jaccard[lat_c, col_c], pl.Float64),
        }
    )
    stat_label = [lab.label for lab in labels]
    similarity, contrast = [None] * d_sae, [None] * d_sae
    texts = None
    if embedder is not None or llm is not None:
        texts = scored_texts(shown.text, scored)
    if embedder is not None:
        # MiniLM on CPU embeds ~100 texts/s: score the most frequent labeled latents, a few contexts each
        freq = table["frequency"].to_list()
        labelled = sorted((i for i in range(d_sae) if stat_label[i]), key=lambda i: -freq[i])[:embed_latents]
        pos_texts, neg_texts = texts
        scores = embedding_scores(
            embedder,
            [stat_label[i] for i in labelled],
            [pos_texts[i][:embed_contexts] for i in labelled],
            [neg_texts[i][:embed_contexts] for i in labelled],
        )
        for i, (sim, con) in zip(labelled, scores):
            similarity[i], contrast[i] = sim, con
    entries = [
        (i, "stat", stat_label[i], detection[i], similarity[i], contrast[i])
        for i in range(d_sae)
        if stat_label[i]
    ]
    if llm is not None:
        entries += llm_label_entries(llm, table, promoted, texts, embedder, embed_contexts)
    entries.sort(key=lambda e: e[0])  # stable: a latent's statistical label first
    label_frame = pl.DataFrame([e[1:] for e in entries], schema=LABEL.to_schema(), orient="row")
    extra = pl.DataFrame(
        {
            "hist_counts": per_latent(
                series(stats.hist.flatten().long(), pl.Int64),
                every.repeat_interleave(stats.hist.shape[1]),
                d_sae,
            ),
            "quantile_examples": per_latent(examples, lat_s, d_sae),
            "decoder_neighbours": per_latent(neighbours, every.repeat_interleave(nb_idx.shape[1]), d_sae),
            "cooccurring": per_latent(cooccurring, lat_c, d_sae),
            "promoted_tokens": promoted,
            "suppressed_tokens": suppressed,
            "stat_label": stat_label,
            "stat_label_evidence": [lab.evidence for lab in labels],
            "detection_score": detection,
            "embedding_similarity": similarity,
            "embedding_contrast": contrast,
            "labels": per_latent(
                label_frame, torch.tensor([e[0] for e in entries], dtype=torch.int64), d_sae
            ),
        },
        schema=pl.Schema(FEATURE_COLUMNS),
    )
    return pl.concat([table, extra], how="horizontal")
