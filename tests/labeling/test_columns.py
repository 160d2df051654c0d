"""The feature table's columns built from tensors equal what per-row Python builds: per-latent lists, marked
windows, top-token labels, detection scores; and the label stage's thread split."""

from __future__ import annotations

import json
import random
from collections import Counter

import polars as pl
import pytest
import torch

from featureatlas.tasks.common.threads import intra_op_threads
from featureatlas.tasks.labeling.code_stream import CodeStream
from featureatlas.tasks.labeling.columns import mark, marked_windows, per_latent
from featureatlas.tasks.labeling.detection import detection_scores, scored_rows
from featureatlas.tasks.labeling.feature_stats import ActivationStats
from featureatlas.tasks.labeling.scoring import balanced_accuracy
from featureatlas.tasks.labeling.stat_labeler import StatLabel, matches
from featureatlas.tasks.labeling.top_contexts import _top_token_labels
from tests.labeling.test_top_contexts import planted_toy


def test_per_latent_cuts_flat_values_into_each_latents_list():
    got = per_latent(pl.Series(["a", "b", "c", "d"]), torch.tensor([0, 0, 2, 2]), 4)
    assert got.to_list() == [["a", "b"], [], ["c", "d"], []]
    frame = pl.DataFrame({"latent": [7, 8, 9], "score": [0.5, 0.25, 1.0]})
    got = per_latent(frame, torch.tensor([1, 1, 2]), 3)
    assert got.dtype == pl.List(pl.Struct({"latent": pl.Int64, "score": pl.Float64}))
    assert got.to_list() == [
        [],
        [{"latent": 7, "score": 0.5}, {"latent": 8, "score": 0.25}],
        [{"latent": 9, "score": 1.0}],
    ]
    empty = per_latent(pl.Series([], dtype=pl.Int64), torch.tensor([], dtype=torch.int64), 2)
    assert empty.dtype == pl.List(pl.Int64) and empty.to_list() == [[], []]
    with pytest.raises(ValueError, match="values for"):
        per_latent(pl.Series([1, 2]), torch.tensor([0]), 2)


def test_mark_leaves_leading_whitespace_outside():
    assert mark(" cat") == " «cat»"
    assert mark("\n\tx ") == "\n\t«x »"
    assert mark("\n") == "\n«»"


def _reference_window(ids: list[int], window: int, display: dict[int, str]):
    """The per-row Python the columns replace: ids < 0 dropped around the centre, the centre marked."""
    before = [t for t in ids[:window] if t >= 0]
    after = [t for t in ids[window + 1 :] if t >= 0]
    toks = [display[t] for t in [*before, ids[window], *after]]
    c = len(before)
    return toks, "".join(toks[:c]) + mark(toks[c]) + "".join(toks[c + 1 :]), c


@pytest.mark.parametrize("half,window", [(3, 3), (4, 2), (1, 0)])
def test_marked_windows_equal_the_per_row_join(half, window):
    gen = torch.Generator().manual_seed(half * 10 + window)
    win = torch.randint(0, 12, (40, 2 * half + 1), generator=gen)
    win[torch.rand(win.shape, generator=gen) < 0.3] = -1  # holes anywhere, edges included
    win[:, half] = torch.randint(0, 12, (40,), generator=gen)
    calls = []

    def token_strings(ids):
        calls.append(ids)
        return [[" a", "b", "\n", " a", "  c"][i % 5] + ("" if i % 5 == 0 else str(i)) for i in ids]

    got = marked_windows(win, half, window, token_strings)
    assert len(calls) == 1 and calls[0] == sorted(set(calls[0]))  # once, on the distinct ids
    display = dict(zip(calls[0], token_strings(calls[0])))
    for i, ids in enumerate(win[:, half - window : half + window + 1].tolist()):
        toks, text, centre = _reference_window(ids, window, display)
        assert got.tokens[i].to_list() == toks
        assert got.text[i] == text
        assert int(got.centre[i]) == centre and int(got.length[i]) == len(toks)
        assert got.centre_token[i] == toks[centre]


def test_top_token_label_counts_equal_strings_and_breaks_ties_to_the_first():
    # latent 0: " a" and " b" twice each, " a" seen first; latent 1: nothing; latent 2: " b" (two ids, one
    # string) beats " a"
    tokens = pl.Series([" a", " b", " b", " a", " a", " b", " b"])
    lat = torch.tensor([0, 0, 0, 0, 2, 2, 2])
    label, share = _top_token_labels(tokens, lat, 3)
    assert label == [json.dumps(" a"), None, json.dumps(" b")]
    assert share == [0.5, None, 2 / 3]
    strings = tokens.to_list()
    for latent in (0, 2):  # the Counter the vectorised count replaces
        mine = [s for s, lt in zip(strings, lat.tolist()) if lt == latent]
        assert json.dumps(Counter(mine).most_common(1)[0][0]) == label[latent]


def test_detection_scores_equal_matches_and_balanced_accuracy():
    rnd = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    d_sae, half, n_win = 30, 2, 50
    win = torch.randint(0, 4, (n_win, 2 * half + 1), generator=gen)
    win[torch.rand(win.shape, generator=gen) < 0.15] = -1
    win[:, half] = torch.randint(0, 4, (n_win,), generator=gen)
    shown_rows = torch.arange(100, 100 + n_win * 3, 3)  # row i's window: i
    row_key = torch.arange(n_win)
    sample_rows = torch.full((d_sae, 2, 3), -1, dtype=torch.int64)
    random_rows = torch.full((d_sae, 4), -1, dtype=torch.int64)
    top_lat, top_key, labels = [], [], []
    for latent in range(d_sae):
        for q in range(2):
            for s in range(rnd.randint(0, 3)):
                sample_rows[latent, q, s] = shown_rows[rnd.randrange(n_win)]
        for s in rnd.sample(range(4), rnd.randint(0, 4)):
            random_rows[latent, s] = shown_rows[rnd.randrange(n_win)]
        for k in sorted(rnd.sample(range(n_win), rnd.randint(0, 3))):
            top_lat.append(latent)
            top_key.append(k)
        items = [tuple(rnd.randrange(4) for _ in range(rnd.choice([1, 2]))) for _ in range(rnd.randint(0, 3))]
        labels.append(StatLabel("x" if items else None, items, "{}"))
    nan = torch.full((d_sae, 2, 3), float("nan"))
    stats = ActivationStats(None, None, sample_rows, nan, random_rows, None, None)
    scored = scored_rows(stats, shown_rows, row_key, torch.tensor(top_lat), torch.tensor(top_key), d_sae)
    got = detection_scores(labels, win, half, scored)

    win_np = win.numpy()
    key = dict(zip(shown_rows.tolist(), row_key.tolist()))
    for latent, lab in enumerate(labels):  # the per-latent Python the tensors replace
        pos = [r for r in sample_rows[latent].flatten().tolist() if r >= 0]
        tops = {k for lt, k in zip(top_lat, top_key) if lt == latent}
        held = [r for r in pos if key[r] not in tops] or pos
        neg = [r for r in random_rows[latent].tolist() if r >= 0]
        assert [key[int(shown_rows[i])] for i in scored.held_out[latent] if i >= 0] == [key[r] for r in held]
        assert [int(k) for k in scored.silent_key[latent] if k >= 0] == [key[r] for r in neg]
        want = None
        if lab.items:
            want = balanced_accuracy(
                [matches(lab.items, win_np, key[r], half) for r in held],
                [matches(lab.items, win_np, key[r], half) for r in neg],
            )
        assert got[latent] == want, latent
    assert any(s is not None for s in got) and any(s is None for s in got)


def test_intra_op_threads_restores_the_callers():
    before = torch.get_num_threads()
    with intra_op_threads(1):
        assert torch.get_num_threads() == 1
        with intra_op_threads(None):
            assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


class ThreadsSeen(torch.nn.Module):
    """A dictionary that records the intra-op threads each encode ran with."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.d_in, self.d_sae, self.seen = inner, inner.d_in, inner.d_sae, []

    def encode(self, acts):
        self.seen.append(torch.get_num_threads())
        return self.inner.encode(acts)


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs two intra-op threads to tell them apart")
def test_stream_encodes_with_its_encode_threads_while_the_caller_runs_on_one():
    dictionary, acts, *_ = planted_toy()
    model = ThreadsSeen(dictionary)
    threads = torch.get_num_threads()
    with intra_op_threads(1), CodeStream(model, lambda: acts.split(37), encode_threads=threads) as stream:
        for _ in stream:
            assert torch.get_num_threads() == 1  # the pass's own work
    assert model.seen and set(model.seen) == {threads}


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs two intra-op threads to tell them apart")
def test_feature_table_encodes_with_the_callers_threads_and_restores_them():
    from tests.labeling.test_table_golden import GOLDEN, ToyRelu, assert_tables_equal, toy_table

    class Recording(ToyRelu):
        def encode(self, acts):
            self.seen.append(torch.get_num_threads())
            return super().encode(acts)

    model = Recording()
    model.seen = []
    threads = torch.get_num_threads()
    table = toy_table(model)
    assert set(model.seen) == {threads} and torch.get_num_threads() == threads
    assert_tables_equal(table, pl.read_parquet(GOLDEN))  # one thread or many: the same table
