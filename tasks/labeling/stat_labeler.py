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

import torch
from torch import Tensor

__all__ = ["NgramCounts", "StatLabel", "count_ngrams", "matches", "statistical_label"]

Ngram = tuple[int, ...]


@dataclass
class NgramCounts:
    """Corpus counts of unigrams and bigrams (token ids), and the number of positions counted."""

    unigrams: Counter
    bigrams: Counter
    n: int

    def rate(self, gram: Ngram) -> float:
        # add-one smoothing: an n-gram never seen in the corpus still gets a finite lift
        table = self.unigrams if len(gram) == 1 else self.bigrams
        return (table.get(gram, 0) + 1) / (self.n + 1)


def count_ngrams(context_tokens: Tensor) -> NgramCounts:
    """Unigram and bigram counts over every real token of `context_tokens [n_ctx, L]` (negative = padding)."""
    ids = context_tokens.long()
    valid = ids >= 0
    uni, cnt = torch.unique(ids[valid], return_counts=True)
    pair_ok = valid[:, 1:] & valid[:, :-1]
    vocab = int(ids.max()) + 1 if ids.numel() else 1
    pairs = ids[:, :-1][pair_ok] * vocab + ids[:, 1:][pair_ok]
    bi, bcnt = torch.unique(pairs, return_counts=True)
    # lists, not tensors, are iterated: one Python int per entry instead of one 0-d tensor
    unigrams = Counter({(t,): c for t, c in zip(uni.tolist(), cnt.tolist())})
    bigrams = Counter({(p // vocab, p % vocab): c for p, c in zip(bi.tolist(), bcnt.tolist())})
    return NgramCounts(unigrams, bigrams, int(valid.sum()))


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
