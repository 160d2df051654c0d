"""TopK training on CUDA recovers a planted dictionary as well as on CPU, and hands the result back on CPU."""

from __future__ import annotations

import pytest
import torch

from featureatlas.schemas.methods import TopKConfig
from featureatlas.tasks.dictionary import train_dictionary
from featureatlas.tasks.dictionary.synthetic import recovery_at_init
from tests.dictionary.test_topk import fvu, plant, recovered_fraction

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_cuda_training_matches_cpu_recovery():
    truth = plant(20_000)
    fresh = plant(4000, data_seed=123).acts
    quality = {}
    cfg = TopKConfig(d_sae=128, k=3, seed=0)
    assert recovery_at_init(cfg, truth.acts, truth.directions)["frr_08"] < 0.2  # not handed the answer
    for device in ("cpu", "cuda"):
        cfg = TopKConfig(
            d_sae=128, k=3, lr=2e-3, batch_size=256, steps=2000, seed=0, device=device, log_every=500
        )
        sae = train_dictionary(cfg, truth.acts).dictionary
        assert sae.W_dec.device.type == "cpu" and sae.input_scale.device.type == "cpu"
        quality[device] = (recovered_fraction(truth.directions, sae), fvu(sae, fresh))

    (cpu_recovered, cpu_fvu), (cuda_recovered, cuda_fvu) = quality["cpu"], quality["cuda"]
    assert cuda_recovered >= 0.85 and cuda_fvu < 0.1
    # Different kernels round differently, so the runs diverge; the quality they reach must not.
    assert abs(cuda_recovered - cpu_recovered) <= 0.1
    assert abs(cuda_fvu - cpu_fvu) <= 0.03


def test_auto_device_uses_cuda_and_bfloat16_acts_train():
    truth = plant(4000)
    cfg = TopKConfig(d_sae=64, k=3, lr=2e-3, batch_size=256, steps=50, device="auto", log_every=10)
    seen_devices = []

    def on_metrics(_metrics: dict[str, float], _step: int) -> None:
        seen_devices.append(torch.cuda.memory_allocated() > 0)

    result = train_dictionary(cfg, truth.acts.to(torch.bfloat16), on_metrics=on_metrics)
    assert all(seen_devices), "with device='auto' and CUDA present, training should allocate on the GPU"
    assert all(torch.isfinite(torch.tensor(list(result.final_metrics.values()))))
