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


# ---- the fast paths equal the plain ones on CUDA (CPU versions: tests/dictionary/test_topk_paths.py) -------


@pytest.mark.parametrize("n_dead", [3, 50])
def test_fixed_size_auxk_equals_the_counted_one_on_cuda(n_dead):
    from tests.dictionary.test_topk_paths import D_IN, D_SAE, fresh_sae, reference_auxk

    sae = fresh_sae().cuda()
    x = plant(256, data_seed=1).acts.cuda() * sae.input_scale
    dead = torch.zeros(D_SAE, dtype=torch.bool, device="cuda")
    dead[torch.randperm(D_SAE)[:n_dead]] = True
    err = torch.randn(256, D_IN, device="cuda")
    pre = sae.pre_acts(x)
    torch.testing.assert_close(sae.auxk_loss(pre, err, dead), reference_auxk(sae, pre, err, dead))


@pytest.mark.parametrize("method", ["topk", "batchtopk", "matryoshka"])
def test_sparse_path_equals_dense_path_on_cuda(method):
    from featureatlas.schemas.methods import BatchTopKConfig, MatryoshkaConfig
    from tests.dictionary.test_topk_paths import D_SAE, fresh_sae

    cfg_cls = {"topk": TopKConfig, "batchtopk": BatchTopKConfig, "matryoshka": MatryoshkaConfig}[method]
    acts = plant(256, data_seed=2).acts.cuda()
    dead = torch.zeros(D_SAE, dtype=torch.bool, device="cuda")
    dead[::3] = True
    results = []
    for sparse in (False, True):
        sae = fresh_sae(cfg_cls).cuda()
        sae.sparse_decoder = sparse
        with _full_fp32():
            out = sae.training_loss(acts, dead)
            out.loss.backward()
        results.append((out.loss, out.auxk_loss, {n: p.grad for n, p in sae.named_parameters()}))
    (loss_d, aux_d, grads_d), (loss_s, aux_s, grads_s) = results
    assert aux_d.item() > 0
    torch.testing.assert_close(loss_s, loss_d, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(aux_s, aux_d, rtol=1e-5, atol=1e-6)
    for name, grad in grads_d.items():
        if grad is not None:
            torch.testing.assert_close(grads_s[name], grad, rtol=1e-4, atol=1e-5)


def test_compiled_step_is_one_graph_on_cuda():
    from tests.dictionary.test_topk_paths import D_SAE, fresh_sae

    sae = fresh_sae().cuda()
    sae.sparse_decoder = False
    acts = plant(256, data_seed=3).acts.cuda()
    dead = torch.arange(D_SAE, device="cuda") % 4 == 0
    explained = torch._dynamo.explain(sae.training_loss)(acts, dead)
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(sae.training_loss, fullgraph=True)(acts, dead)
    plain = sae.training_loss(acts, dead)
    torch.testing.assert_close(compiled.loss, plain.loss, rtol=1e-4, atol=1e-5)


def test_training_uses_tf32_by_default_and_restores_the_setting():
    from featureatlas.tasks.dictionary.train import matmul_precision

    before = torch.get_float32_matmul_precision()
    seen = []
    with matmul_precision(torch.device("cuda"), tf32=True):
        seen.append(torch.get_float32_matmul_precision())
    with matmul_precision(torch.device("cuda"), tf32=False):
        seen.append(torch.get_float32_matmul_precision())
    assert seen == ["high", "highest"] and torch.get_float32_matmul_precision() == before
    assert TopKConfig().tf32 is True
    fp32 = train_dictionary(TopKConfig(d_sae=64, k=3, steps=20, tf32=False, device="cuda"), plant(4000).acts)
    tf32 = train_dictionary(TopKConfig(d_sae=64, k=3, steps=20, device="cuda"), plant(4000).acts)
    assert abs(fp32.final_metrics["fvu"] - tf32.final_metrics["fvu"]) < 0.01


class _full_fp32:
    """float32 matmuls in full precision inside (the paths are compared, not TF32 rounding)."""

    def __enter__(self):
        self.before = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")

    def __exit__(self, *exc):
        torch.set_float32_matmul_precision(self.before)
