"""Trainer upgrades: AdamW, the learning-rate schedule (logged per step), b_dec from the geometric median,
frozen parameters left alone, and NaN / diverging losses stopped with the step named."""

from __future__ import annotations

import pytest
import torch

from featureatlas.schemas.methods import ReLUConfig, TopKConfig
from featureatlas.tasks.dictionary import build_dictionary, train_dictionary
from featureatlas.tasks.dictionary.relu import ReLUSAE
from featureatlas.tasks.dictionary.sae_common import geometric_median, input_statistics
from featureatlas.tasks.dictionary.train import check_loss, lr_factor
from tests.dictionary.test_topk import plant


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_lr_factor_warms_up_holds_and_decays():
    # 10 steps, warm-up 4, decay over the last 40% (4 steps): 1/4, 2/4, 3/4, 1, 1, 1, then 4/4 .. 1/4.
    factors = [lr_factor(step, 10, 4, 0.4) for step in range(1, 11)]
    assert factors == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25]
    assert [lr_factor(step, 5, 0, 0.0) for step in range(1, 6)] == [1.0] * 5


def test_lr_is_logged_every_logged_step():
    cfg = TopKConfig(
        d_sae=32, k=2, lr=1e-2, batch_size=64, steps=10, log_every=2, warmup_steps=4, decay_fraction=0.4
    )
    logged: dict[int, float] = {}
    train_dictionary(
        cfg.model_copy(update={"device": "cpu"}),
        plant(500).acts,
        on_metrics=lambda m, s: logged.update({s: m["lr"]}),
    )
    assert logged == pytest.approx({2: 5e-3, 4: 1e-2, 6: 1e-2, 8: 7.5e-3, 10: 2.5e-3})


def test_weight_decay_shrinks_the_weights():
    acts = plant(500).acts
    base = dict(d_sae=32, k=2, lr=1e-2, batch_size=64, steps=30, device="cpu")
    plain = train_dictionary(TopKConfig(**base), acts).dictionary
    decayed = train_dictionary(TopKConfig(**base, weight_decay=5.0), acts).dictionary
    assert decayed.W_enc.norm() < 0.9 * plain.W_enc.norm()


def test_geometric_median_ignores_outliers():
    # 97 points near (1, 1) and 3 far outliers: the mean is dragged away, the median stays.
    points = torch.cat([torch.ones(97, 2) + 0.01 * torch.randn(97, 2), torch.full((3, 2), 1000.0)])
    median = geometric_median(points.double())
    assert (median - 1).abs().max() < 0.05 and (points.mean(0) - 1).abs().min() > 20


def test_b_dec_init_choices():
    acts = torch.cat([torch.ones(990, 4) + 0.1 * torch.randn(990, 4), torch.full((10, 4), 500.0)])
    scale_mean, b_mean = input_statistics(acts, "mean")
    scale_median, b_median = input_statistics(acts, "geometric_median")
    assert scale_mean == scale_median
    assert (b_median / scale_median - 1).abs().max() < 0.1 and (b_mean / scale_mean - 1).abs().min() > 3
    assert input_statistics(acts, "zeros")[1].abs().max() == 0
    sae = build_dictionary(ReLUConfig(d_sae=8, b_dec_init="geometric_median"), d_in=4)
    sae.init_from_data(acts)
    torch.testing.assert_close(sae.b_dec, b_median.float())


def test_check_loss_names_the_step():
    with pytest.raises(FloatingPointError, match="step 7"):
        check_loss(float("nan"), 7, 1.0)
    with pytest.raises(FloatingPointError, match="diverged at step 9"):
        check_loss(5000.0, 9, 1.0)
    check_loss(50.0, 9, 1.0)


def test_nan_loss_stops_training_with_the_step(monkeypatch):
    real = ReLUSAE.training_loss
    calls = {"n": 0}

    def poisoned(self, acts, dead_mask):
        calls["n"] += 1
        out = real(self, acts, dead_mask)
        return out._replace(loss=out.loss * float("nan")) if calls["n"] >= 5 else out

    monkeypatch.setattr(ReLUSAE, "training_loss", poisoned)
    cfg = ReLUConfig(d_sae=16, batch_size=32, steps=12, log_every=2, device="cpu")
    with pytest.raises(FloatingPointError, match="step 6"):  # poisoned from step 5, caught at the next log
        train_dictionary(cfg, plant(200).acts)
