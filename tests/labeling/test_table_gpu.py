"""Labeling with the dictionary on CUDA: the firing codes and every statistic stay on the device, and the
feature table equals the CPU one (the pinned seeded toy), through either co-occurrence way."""

from __future__ import annotations

import polars as pl
import pytest
import torch

from featureatlas.tasks.labeling import feature_stats
from featureatlas.tasks.labeling.code_stream import CodeStream
from tests.labeling.test_table_golden import GOLDEN, ToyRelu, assert_tables_equal, toy_corpus, toy_table

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("dense_cost", [0, 10**9])  # 0: count the firing pairs; 10^9: one matmul
@pytest.mark.parametrize("spill_budget", [8 << 30, 0])
def test_cuda_table_equals_the_cpu_one(monkeypatch, dense_cost, spill_budget):
    monkeypatch.setattr(feature_stats, "DENSE_PAIR_COST", dense_cost)
    table = toy_table(dictionary=ToyRelu().cuda(), spill_budget=spill_budget)
    assert_tables_equal(table, pl.read_parquet(GOLDEN))


@pytest.mark.parametrize("resident_budget", [1 << 30, 0])  # kept on the device, or read back from disk
def test_cuda_codes_stay_on_the_device(resident_budget):
    acts = toy_corpus()[0]
    dictionary = ToyRelu().cuda()
    with CodeStream(dictionary, lambda: acts.split(37), resident_budget=resident_budget) as codes:
        for _ in range(2):  # the encode pass, then the spilled codes read back
            for b in codes:
                assert b.rows.is_cuda and b.latents.is_cuda and b.values.is_cuda
