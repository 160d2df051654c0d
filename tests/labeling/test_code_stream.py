"""CodeStream encodes once and reads its spill back; past its spill budget it re-encodes: same codes."""

from __future__ import annotations

import pytest
import torch

from featureatlas.tasks.labeling.code_stream import CodeStream, smallest_per_group
from tests.labeling.test_top_contexts import planted_toy


class Counting(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.d_in, self.d_sae, self.calls = inner, inner.d_in, inner.d_sae, 0

    def encode(self, acts):
        self.calls += 1
        return self.inner.encode(acts)


def _dense(stream, n, d_sae):
    out = torch.zeros(n, d_sae)
    for b in stream:
        assert torch.all(b.values > 0) and torch.all(b.rows >= b.start) and torch.all(b.rows < b.start + b.n)
        out[b.rows, b.latents] = b.values
    return out


@pytest.mark.parametrize("resident_budget", [1 << 30, 0, 12 * 400])  # in memory, on disk, both
def test_stream_encodes_once_and_matches_the_dense_codes(resident_budget):
    dictionary, acts, *_ = planted_toy()
    model = Counting(dictionary)
    expected = torch.relu(dictionary.encode(acts)).detach()
    with CodeStream(model, lambda: acts.split(37), resident_budget=resident_budget) as stream:
        for _ in range(3):
            assert torch.allclose(_dense(stream, len(acts), 12), expected)
        assert stream.encode_passes == 1 and model.calls == len(acts.split(37)) and stream.n_rows == len(acts)
        folder = stream._folder
        on_disk = sum(1 for _ in folder.iterdir())
        if resident_budget == 1 << 30:
            assert on_disk == 0
        elif resident_budget == 0:
            assert on_disk == len(stream._files)
        else:
            assert 0 < on_disk < len(stream._files)
    assert not folder.exists()  # the spill is removed on close


def test_stream_past_its_budget_encodes_every_pass():
    dictionary, acts, *_ = planted_toy()
    model = Counting(dictionary)
    expected = torch.relu(dictionary.encode(acts)).detach()
    with CodeStream(model, lambda: acts.split(37), spill_budget=100) as stream:
        for _ in range(2):
            assert torch.allclose(_dense(stream, len(acts), 12), expected)
        assert stream.encode_passes == 2 and stream._folder is None


def test_smallest_per_group_keeps_k_per_group_ties_to_the_first():
    group = torch.tensor([1, 0, 1, 1, 0, 2])
    score = torch.tensor([0.5, 0.2, 0.1, 0.5, 0.9, 0.3])
    # group 0: 0.2 (1), 0.9 (4); group 1: 0.1 (2), then the tie 0.5 at 0 and 3 keeps index 0; group 2: 5
    assert smallest_per_group(group, score, 2).tolist() == [1, 4, 2, 0, 5]


@pytest.mark.parametrize("resident_budget,trims", [(1 << 30, 0), (0, 1)])
def test_memory_is_handed_back_after_a_pass_only_when_it_read_spilled_codes(
    monkeypatch, resident_budget, trims
):
    from featureatlas.tasks.labeling import code_stream

    dictionary, acts, *_ = planted_toy()
    with CodeStream(dictionary, lambda: acts.split(37), resident_budget=resident_budget) as stream:
        for _ in stream:  # the encode pass hands back its dense batches' memory either way
            pass
        calls = []
        monkeypatch.setattr(code_stream, "release_freed_memory", lambda: calls.append(1))
        for _ in stream:
            pass
        assert len(calls) == trims
