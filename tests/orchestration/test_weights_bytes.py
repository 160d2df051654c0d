"""A saved dictionary is the same bytes however it was made: a training resumed from a checkpoint writes
the `weights.safetensors` of an uninterrupted one, byte for byte, as caches do."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from featureatlas.schemas.methods import TopKConfig
from featureatlas.tasks.dictionary.base import WEIGHTS_NAME
from featureatlas.tasks.dictionary.train import train_dictionary
from tests.dictionary.test_topk import plant


def _stop_at(step: int):
    def stop(_metrics, at):
        if at == step:
            raise KeyboardInterrupt  # a Ctrl-C after the checkpoint

    return stop


def test_resumed_training_saves_the_bytes_of_an_uninterrupted_one(tmp_path):
    torch.set_num_threads(1)
    cfg = TopKConfig(d_sae=64, k=4, batch_size=40, steps=24, checkpoint_every=10, log_every=4, device="cpu")
    acts = plant(300).acts
    whole = train_dictionary(cfg, acts).dictionary
    with pytest.raises(KeyboardInterrupt):
        train_dictionary(cfg, acts, on_metrics=_stop_at(16), checkpoint_dir=tmp_path / "ckpt")
    resumed = train_dictionary(cfg, acts, checkpoint_dir=tmp_path / "ckpt").dictionary

    want = (whole.save(tmp_path / "whole") / WEIGHTS_NAME).read_bytes()
    assert (resumed.save(tmp_path / "resumed") / WEIGHTS_NAME).read_bytes() == want
    # the metadata's key order used to vary from one save to the next (a seeded hash map): 16 saves agree
    assert {(whole.save(tmp_path / f"again{i}") / WEIGHTS_NAME).read_bytes() for i in range(16)} == {want}
    with safe_open(str(tmp_path / "whole" / WEIGHTS_NAME), "pt") as f:
        assert f.metadata() == {"method": "topk", "format_version": "1"}
        assert sorted(f.keys()) == sorted(whole.state_dict())
