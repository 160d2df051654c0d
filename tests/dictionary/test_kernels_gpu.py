"""On CUDA the compiled Triton kernels of the sparse path equal the torch path, and `auto` picks them."""

from __future__ import annotations

import pytest
import torch

from featureatlas.schemas.methods import BatchTopKConfig, MatryoshkaConfig, TopKConfig
from featureatlas.tasks.dictionary import build_dictionary, kernels
from featureatlas.tasks.dictionary.kernels import sparse_kernels, use_kernels
from tests.dictionary.kernel_cases import check_bag_sum, check_select_pre

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(not kernels.triton_available(), reason="needs Triton (CUDA builds of torch ship it)"),
]

SIZES = [(6, 40, 20, 3), (5, 17, 300, 1), (512, 1000, 300, 8), (2048, 16384, 64, 32)]


@pytest.mark.parametrize(("n_rows", "d_sae", "d_in", "k"), SIZES)
def test_bag_sum_equals_the_dense_product_on_cuda(n_rows, d_sae, d_in, k):
    check_bag_sum(n_rows, d_sae, d_in, k, "cuda", atol=1e-4, rtol=1e-4)


def test_bag_sum_takes_strided_inputs_on_cuda():
    check_bag_sum(300, 500, 200, 8, "cuda", strided=True, atol=1e-4, rtol=1e-4)


def test_bag_sum_in_bfloat16_on_cuda():
    check_bag_sum(300, 500, 200, 8, "cuda", dtype=torch.bfloat16, atol=3e-2, rtol=2e-2)


@pytest.mark.parametrize(("n_rows", "d_sae", "d_in", "k"), SIZES)
def test_select_pre_equals_the_torch_backward_on_cuda(n_rows, d_sae, d_in, k):
    check_select_pre(n_rows, d_sae, d_in, k, "cuda", atol=1e-4, rtol=1e-4)


CONFIGS = {
    "topk": TopKConfig(d_sae=1024, k=16),
    "batchtopk": BatchTopKConfig(d_sae=1024, k=16),
    "matryoshka": MatryoshkaConfig(d_sae=1024, k=16),
}


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("method", list(CONFIGS))
def test_training_step_with_kernels_equals_the_torch_one_on_cuda(method, autocast):
    acts = torch.randn(1024, 96, generator=torch.Generator().manual_seed(0))
    dead = torch.zeros(1024, dtype=torch.bool, device="cuda")
    dead[-100:] = True  # AuxK on
    results = {}
    for mode in ("off", "on"):
        sae = build_dictionary(CONFIGS[method], 96)
        sae.init_from_data(acts)
        sae.to("cuda").train()
        sae.sparse_decoder = True
        with sparse_kernels(mode), torch.autocast("cuda", torch.bfloat16, enabled=autocast):
            out = sae.training_loss(acts.cuda(), dead)
        out.loss.backward()
        results[mode] = (out.loss.detach(), out.auxk_loss, out.codes, *(p.grad for p in sae.parameters()))
    assert results["on"][1] > 0
    names = ("loss", "auxk_loss", "codes", *(name for name, _ in sae.named_parameters()))
    for name, torch_t, kernel_t in zip(names, results["off"], results["on"]):
        assert torch_t.abs().sum() > 0, name
        if autocast:  # bf16 code gradients may round differently after a different summation order
            assert (kernel_t - torch_t).norm() <= 1e-2 * torch_t.norm(), name
        else:
            torch.testing.assert_close(kernel_t, torch_t, rtol=1e-4, atol=1e-5, msg=name)


def test_auto_uses_the_kernels_on_cuda_only():
    with sparse_kernels("auto"):
        assert use_kernels(torch.device("cuda"))
        assert not use_kernels(torch.device("cpu"))
    with sparse_kernels("off"):
        assert not use_kernels(torch.device("cuda"))
