"""The Triton kernels of the sparse path equal the torch path, run on CPU in Triton's interpreter.

The interpreter executes the same kernel code program by program with numpy, so the indexing, masking, the
per-latent accumulation and the gradient layouts are checked here without a GPU; compiled behaviour on a GPU
is tests/dictionary/test_kernels_gpu.py's. Triton is not a dependency of CPU installs (its wheel is ~290 MB,
~1 GB installed): without it these tests skip.
"""

from __future__ import annotations

import os

import pytest
import torch

from featureatlas.tasks.dictionary import kernels
from featureatlas.tasks.dictionary.kernels import sparse_kernels, use_kernels
from tests.dictionary.kernel_cases import check_bag_sum, check_select_pre, entries
from tests.dictionary.test_sparse_decoder import D_SAE, hand_set, step

if not torch.cuda.is_available():
    # Read when the kernels are first compiled (decorated), which happens on their first call, below.
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytestmark = [
    pytest.mark.skipif(not kernels.triton_available(), reason="needs Triton (pip install triton)"),
    pytest.mark.skipif(
        torch.cuda.is_available(),
        reason="with CUDA the kernels compile for the GPU; tests/dictionary/test_kernels_gpu.py covers them",
    ),
]


@pytest.mark.parametrize(
    ("n_rows", "d_sae", "d_in", "k"),
    [(6, 40, 20, 3), (5, 17, 300, 1), (9, 70, 33, 4)],  # d_in over one 256-wide block; k = 1; odd d_sae
)
def test_bag_sum_equals_the_dense_product(n_rows, d_sae, d_in, k):
    check_bag_sum(n_rows, d_sae, d_in, k, "cpu")


def test_bag_sum_takes_strided_inputs():
    check_bag_sum(6, 40, 20, 3, "cpu", strided=True)


def test_bag_sum_in_bfloat16_within_its_rounding():
    check_bag_sum(6, 40, 20, 3, "cpu", dtype=torch.bfloat16, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize(("n_rows", "d_sae", "d_in", "k"), [(6, 40, 20, 3), (4, 33, 70, 1), (7, 65, 9, 5)])
def test_select_pre_equals_the_torch_backward(n_rows, d_sae, d_in, k):
    check_select_pre(n_rows, d_sae, d_in, k, "cpu")


def test_entries_share_latents_and_leave_a_bag_empty():
    # guards the cases above: without these properties they would not test what they claim
    rows, cols = entries(6, 40, 3, "cpu")
    assert (cols == 1).sum() == 5 and (rows == 5).sum() == 0 and (cols == 39).sum() == 0


@pytest.mark.parametrize("method", ["topk", "batchtopk", "matryoshka"])
@pytest.mark.parametrize("n_dead", [0, 3])
def test_training_step_with_kernels_equals_the_torch_one(method, n_dead):
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[D_SAE - n_dead :] = True  # AuxK on when some latents count as dead
    with sparse_kernels("off"):
        torch_out, torch_grads = step(hand_set(method), True, dead)
    with sparse_kernels("on"):
        kernel_out, kernel_grads = step(hand_set(method), True, dead)
    torch.testing.assert_close(kernel_out.codes, torch_out.codes)
    for field in ("loss", "fvu", "auxk_loss"):
        torch.testing.assert_close(getattr(kernel_out, field), getattr(torch_out, field))
    for name, grad in torch_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(kernel_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_the_mode_picks_the_path(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(kernels.MODE_ENV, raising=False)
    assert not use_kernels(cpu)  # auto: CPU keeps the torch path
    monkeypatch.setenv(kernels.MODE_ENV, "on")
    assert use_kernels(cpu)
    with sparse_kernels("off"):  # the context manager outranks the environment
        assert not use_kernels(cpu)
    assert use_kernels(cpu)
    monkeypatch.setenv(kernels.MODE_ENV, "fast")
    with pytest.raises(ValueError, match="auto, on, off"):
        use_kernels(cpu)


def test_cpu_tensors_outside_the_interpreter_get_a_clear_error(monkeypatch):
    from featureatlas.tasks.dictionary.kernels.triton_sparse import gather_sum

    monkeypatch.delenv("TRITON_INTERPRET")
    ptr = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        gather_sum(torch.tensor([0]), torch.ones(2, 3), torch.ones(1), ptr)
