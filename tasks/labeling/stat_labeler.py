"""A statistical labeler (no LLM): n-grams enriched at a latent's max-activating positions.

For each latent, the unigram at each top context's max position and the bigram ending there are counted and
compared with their base rate in the corpus. An n-gram is kept when it covers at least `min_share` of the top
contexts and is at least `min_lift` times more common there than in the corpus; the label names up to
`max_items` of them (a bigram replaces its own last token when it covers nearly as many contexts, being
more specific). The label says only what the latent reads: the token its decoder direction promotes most
(what it writes, through the logit lens) is a different kind of fact, so it goes into the evidence and the
atlas shows it apart, never into the label text (nor into the label's detection and embedding scores).
The evidence (share, base rate, lift of every kept n-gram; the top promoted token) is kept as JSON.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["NgramCounts", "StatLabel", "count_ngrams", "matches", "statistical_label"]

Ngram = tuple[int, ...]


NGRAM_CHUNK_TOKENS = 1 << 22  # positions counted at a time: memory set by this and the distinct n-grams


@dataclass
class NgramCounts:
    """Corpus counts of unigrams (`unigrams [vocab]`, by id) and bigrams (sorted keys `a * vocab + b` with
    their counts), and the number of positions counted. Arrays, not dicts of tuples: a 10^8-token corpus
    holds millions of distinct bigrams, 16 bytes each here instead of a few hundred as Python objects."""

    unigrams: np.ndarray
    bigram_keys: np.ndarray
    bigram_counts: np.ndarray
    vocab: int
    n: int

    def count(self, gram: Ngram) -> int:
        if any(not 0 <= t < self.vocab for t in gram):
            return 0
        if len(gram) == 1:
            return int(self.unigrams[gram[0]])
        key = gram[0] * self.vocab + gram[1]
        at = int(np.searchsorted(self.bigram_keys, key))
        found = at < len(self.bigram_keys) and self.bigram_keys[at] == key
        return int(self.bigram_counts[at]) if found else 0

    def rate(self, gram: Ngram) -> float:
        # add-one smoothing: an n-gram never seen in the corpus still gets a finite lift
        return (self.count(gram) + 1) / (self.n + 1)


def count_ngrams(context_tokens: Tensor, chunk_tokens: int = NGRAM_CHUNK_TOKENS) -> NgramCounts:
    """Unigram and bigram counts over every real token of `context_tokens [n_ctx, L]` (negative = padding),
    counted `chunk_tokens` positions at a time and merged, so memory follows the distinct n-grams."""
    n_ctx, length = context_tokens.shape if context_tokens.ndim == 2 else (0, 1)
    vocab = max(int(context_tokens.max()) + 1, 1) if context_tokens.numel() else 1
    unigrams = torch.zeros(vocab, dtype=torch.int64)
    keys, counts = torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64)
    n = 0
    step = max(1, chunk_tokens // max(length, 1))
    for a in range(0, n_ctx, step):
        ids = context_tokens[a : a + step].long()
        valid = ids >= 0
        n += int(valid.sum())
        unigrams += torch.bincount(ids[valid], minlength=vocab)
        pair_ok = valid[:, 1:] & valid[:, :-1]
        new, c = torch.unique(ids[:, :-1][pair_ok] * vocab + ids[:, 1:][pair_ok], return_counts=True)
        keys, where = torch.unique(torch.cat([keys, new]), return_inverse=True)
        counts = torch.zeros(len(keys), dtype=torch.int64).index_add_(0, where, torch.cat([counts, c]))
    return NgramCounts(unigrams.numpy(), keys.numpy(), counts.numpy(), vocab, n)


@dataclass
class StatLabel:
    label: str | None
    items: list[Ngram]
    evidence: str


def statistical_label(
    contexts: Sequence[tuple[int, int]],
    context_tokens: Tensor,
    counts: NgramCounts,
    token_strings: Callable[[list[int]], list[str]],
    *,
    promoted: Sequence[int] = (),
    min_share: float = 0.3,
    min_lift: float = 2.0,
    max_items: int = 3,
) -> StatLabel:
    """Label one latent from its top `contexts` [(context, position), ...]; `promoted`: top logit ids."""
    if not contexts:
        return StatLabel(None, [], "{}")
    grams: Counter = Counter()
    for ctx, pos in contexts:
        tok = int(context_tokens[ctx, pos])
        grams[(tok,)] += 1
        if pos > 0 and int(context_tokens[ctx, pos - 1]) >= 0:
            grams[(int(context_tokens[ctx, pos - 1]), tok)] += 1
    n = len(contexts)
    scored = []
    for gram, c in grams.items():
        share, base = c / n, counts.rate(gram)
        lift = share / base
        if share >= min_share and lift >= min_lift:
            scored.append((share * math.log(lift), gram, share, base, lift))
    scored.sort(key=lambda s: (-s[2], -s[0], len(s[1])))
    kept: list[tuple] = []
    for s in scored:
        gram, share = s[1], s[2]
        # A bigram covering nearly as many contexts as its last token is the more specific label.
        # A weaker one only restates its last token, which is already in the label.
        shadow = [k for k in kept if len(k[1]) == 1 and gram[-1:] == k[1]]
        if len(gram) == 2 and shadow:
            if share >= 0.8 * shadow[0][2]:
                kept[kept.index(shadow[0])] = s
        elif not any(len(k[1]) == 2 and k[1][-1:] == gram for k in kept):
            kept.append(s)
    kept = kept[:max_items]
    ids = sorted({t for s in kept for t in s[1]} | set(promoted[:1]))
    text = dict(zip(ids, token_strings(ids))) if ids else {}
    names = [json.dumps("".join(text[t] for t in s[1]), ensure_ascii=False) for s in kept]
    label = " | ".join(names) if names else None
    evidence = {
        "ngrams": [
            {
                "text": name,
                "ids": list(s[1]),
                "share": round(s[2], 4),
                "base_rate": s[3],
                "lift": round(s[4], 2),
            }
            for name, s in zip(names, kept)
        ],
        "promoted": [text[promoted[0]]] if promoted and label is not None else [],
        "n_contexts": n,
    }
    return StatLabel(label, [s[1] for s in kept], json.dumps(evidence, ensure_ascii=False))


def matches(items: Sequence[Ngram], context_tokens: Tensor, ctx: int, pos: int) -> bool:
    """Does one of the label's n-grams end at position `pos` of context `ctx`?"""
    for gram in items:
        lo = pos - len(gram) + 1
        if lo >= 0 and tuple(int(t) for t in context_tokens[ctx, lo : pos + 1]) == tuple(gram):
            return True
    return False
