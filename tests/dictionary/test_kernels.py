"""The Triton kernels of the sparse path equal the torch path, run on CPU in Triton's interpreter.

The interpreter executes the same kernel code program by program with numpy, so the indexing, masking, the
per-latent accumulation and the gradient layouts are checked here without a GPU; compiled behaviour on a GPU
is tests/dictionary/test_kernels_gpu.py's. Triton is not a dependency of CPU installs (its wheel is ~290 MB,
~1 GB installed): without it these tests skip.
"""

from __future__ import annotations

import pytest
import torch

from featureatlas.tasks.dictionary import kernels
from featureatlas.tasks.dictionary.kernels import sparse_kernels, use_kernels
from tests.dictionary.kernel_cases import check_bag_sum, check_select_pre, entries
from tests.dictionary.test_sparse_decoder import D_SAE, hand_set, step

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
    assert not use_kernels(cpu)  # off by default
    monkeypatch.setenv(kernels.MODE_ENV, "auto")
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


def test_kernels_compile_for_a_hopper_gpu(monkeypatch):
    # The interpreter runs the kernels' Python; this runs Triton's compiler on them as a launch on an H100 or
    # H200 would (sm_90, with the strides of 1 and the constants a launch specialises), down to a cubin: it
    # catches what only compilation rejects (types of loop-carried values, layouts). No GPU needed.
    # Triton reads TRITON_INTERPRET while it compiles too (3.9 hands the code generator the interpreter's
    # builtins when it is set), so the compiler runs with it off.
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from featureatlas.tasks.dictionary.kernels import triton_sparse as ts

    monkeypatch.setenv("TRITON_INTERPRET", "0")

    def compile_(kernel, types: dict[str, str], constants: dict, num_warps: int) -> None:
        fn = triton.JITFunction(getattr(kernel, "fn", kernel))  # a plain jit function, even when interpreting
        signature = {
            name: types.get(name, "constexpr" if name in constants else "i32") for name in fn.arg_names
        }
        compiled = triton.compile(
            ASTSource(fn, signature, constants),
            target=GPUTarget("cuda", 90, 32),
            options={"num_warps": num_warps},
        )
        assert compiled.asm["cubin"]

    for t in ("fp32", "bf16"):
        ptrs = {
            "index_ptr": "*i64",
            "ptr_ptr": "*i64",
            "out_ptr": f"*{t}",
            "table_ptr": f"*{t}",
            "weight_ptr": f"*{t}",
        }
        compile_(ts._gather_sum_kernel, ptrs, {"s_t1": 1, "BLOCK": ts.BLOCK_D}, 2)
        ptrs = {"grad_table_ptr": f"*{t}", "part_ptr": "*fp32", "grad_ptr": f"*{t}", "table_ptr": f"*{t}"}
        ptrs |= {"bag_ptr": "*i64", "weight_ptr": f"*{t}", "pos_ptr": "*i64", "latent_ptr": "*i64"}
        for want_table, want_weights in ((True, True), (True, False), (False, True)):
            constants = {"s_g1": 1, "s_t1": 1, "LATENTS": ts.ROW_LATENTS, "BLOCK": ts.BLOCK_D}
            constants |= {"WANT_TABLE": want_table, "WANT_WEIGHTS": want_weights}
            compile_(ts._scatter_rows_kernel, ptrs, constants, 2)
    ptrs = {"grad_ptr": "*fp32", "sums_ptr": "*fp32", "src_ptr": "*fp32", "row_ptr": "*i64"}
    ptrs |= {"weight_ptr": "*fp32", "latent_ptr": "*i64"}
    constants = {"s_s1": 1, "LATENTS": ts.COL_LATENTS, "BLOCK": ts.COL_BLOCK_D}
    compile_(ts._scatter_cols_kernel, ptrs, constants, 4)
