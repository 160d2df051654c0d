"""On CUDA the TopK family's sparse path equals the dense one, as on CPU, and `auto` trains with it."""

from __future__ import annotations

import pytest
import torch

from featureatlas.schemas.methods import BatchTopKConfig, MatryoshkaConfig, TopKConfig
from featureatlas.tasks.dictionary import build_dictionary
from featureatlas.tasks.dictionary.sparse_decoder import use_sparse_path

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

CONFIGS = {
    "topk": TopKConfig(d_sae=256, k=8),
    "batchtopk": BatchTopKConfig(d_sae=256, k=8),
    "matryoshka": MatryoshkaConfig(d_sae=256, k=8),
}


@pytest.mark.parametrize("method", list(CONFIGS))
def test_sparse_and_dense_paths_agree_on_cuda(method):
    acts = torch.randn(512, 64, generator=torch.Generator().manual_seed(0))
    dead = torch.zeros(256, dtype=torch.bool, device="cuda")
    dead[-40:] = True  # AuxK on
    results = {}
    for sparse in (False, True):
        sae = build_dictionary(CONFIGS[method], 64)
        sae.init_from_data(acts)
        sae.to("cuda").train()
        sae.sparse_decoder = sparse
        out = sae.training_loss(acts.cuda(), dead)
        out.loss.backward()
        results[sparse] = (out.loss.detach(), out.codes, *(p.grad for p in sae.parameters()))
    assert results[True][0] > 0
    for dense_t, sparse_t in zip(results[False], results[True]):
        torch.testing.assert_close(sparse_t, dense_t, rtol=1e-4, atol=1e-5)


def test_auto_picks_the_sparse_path_on_cuda():
    assert use_sparse_path(None, torch.device("cuda"))
    assert not use_sparse_path(False, torch.device("cuda"))
