"""DDP training under torchrun (gloo, two CPU processes) gives the weights of one process on the same data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from featureatlas.schemas.methods import GBAConfig, ReLUConfig, TopKConfig
from featureatlas.tasks.dictionary.distributed import train_data_parallel
from featureatlas.tasks.dictionary.train import train_dictionary

REPO = Path(__file__).parents[2]


def _planted_acts(n: int = 1024, d_in: int = 16, n_features: int = 48, seed: int = 0) -> torch.Tensor:
    """Sparse non-negative combinations of random unit directions, plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(n_features, d_in, generator=g), dim=1)
    active = torch.rand(n, n_features, generator=g) < 0.08
    coefs = torch.rand(n, n_features, generator=g) * active
    return coefs @ directions + 0.01 * torch.randn(n, d_in, generator=g)


def _weights(dictionary) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in dictionary.state_dict().items()}


CONFIGS = [
    TopKConfig(d_sae=64, k=4, batch_size=128, epochs=2, lr=1e-3, log_every=4, device="cpu"),
    ReLUConfig(d_sae=64, l1_coef=1.0, batch_size=128, steps=12, lr=1e-3, log_every=4, device="cpu"),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.method)
def test_one_rank_is_the_plain_trainer(cfg):
    acts = _planted_acts()
    plain = _weights(train_dictionary(cfg, acts).dictionary)
    parallel = _weights(train_data_parallel(cfg, acts, world_size=1).dictionary)
    assert plain.keys() == parallel.keys()
    for key in plain:
        assert torch.equal(plain[key], parallel[key]), key


def test_methods_with_per_rank_state_and_odd_batches_are_refused():
    acts = _planted_acts(n=256)
    with pytest.raises(ValueError, match="cannot train data-parallel"):
        train_data_parallel(GBAConfig(d_sae=64, batch_size=128, steps=2), acts, world_size=2)
    with pytest.raises(ValueError, match="does not split over 2 ranks; use a multiple of 2"):
        train_data_parallel(TopKConfig(d_sae=64, k=4, batch_size=127, steps=2), acts, world_size=2)


@pytest.mark.slow  # two torchrun processes start torch each: ~30 s on a loaded 2-core machine
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.method)
def test_torchrun_two_gloo_ranks_match_one_process_on_the_same_micro_batches(tmp_path, cfg):
    acts = _planted_acts()
    save_file({"acts": acts.contiguous()}, tmp_path / "acts.safetensors")
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.model_dump(mode="json")))
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "featureatlas.tasks.dictionary.distributed",
        "--acts", str(tmp_path / "acts.safetensors"), "--config", str(tmp_path / "cfg.json"),
        "--out", str(tmp_path / "ddp"),
    ]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr.decode()[-4000:]
    ddp = load_file(tmp_path / "ddp" / "weights.safetensors")

    reference = _weights(train_data_parallel(cfg, acts, world_size=2).dictionary)
    single_batch = _weights(train_dictionary(cfg, acts).dictionary)
    assert ddp.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(ddp[key], reference[key], rtol=1e-4, atol=1e-5)
    # and training really moved the weights, differently from one whole-batch FVU per step
    assert not torch.allclose(reference["W_dec"], single_batch["W_dec"], atol=1e-5)
