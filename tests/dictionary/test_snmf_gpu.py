"""Semi-NMF on CUDA: its passes run on the device (G and the sums there), recover the planted factorisation
as on CPU with a monotone loss, and hand the dictionary back on CPU."""

from __future__ import annotations

import pytest
import torch

from tests.dictionary.test_snmf import fit_planted, min_match, monotone

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_cuda_fit_recovers_as_on_cpu():
    quality = {}
    for device in ("cpu", "cuda"):
        truth, result, losses = fit_planted(0, device=device)
        quality[device] = (min_match(truth, result.dictionary), losses[-1])
        assert result.dictionary.W_dec.device.type == "cpu"
        assert monotone(losses)
    (cpu_match, cpu_loss), (cuda_match, cuda_loss) = quality["cpu"], quality["cuda"]
    assert cuda_match > 0.95 and abs(cuda_match - cpu_match) < 0.02
    assert cuda_loss == pytest.approx(cpu_loss, rel=0.05)


def test_cuda_fit_allocates_on_the_device():
    torch.cuda.reset_peak_memory_stats()
    fit_planted(0, device="cuda", max_iters=5)
    # G (2000 x 8) and the float64 sums at least: the passes ran there, not on the CPU
    assert torch.cuda.max_memory_allocated() >= 2000 * 8 * 4
