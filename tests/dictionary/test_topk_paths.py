"""The TopK family's fast paths equal the plain ones: the fixed-size AuxK selection equals Gao et al.'s
k_aux = min(d_in / 2, n_dead), the sparse path equals the dense one with dead latents present (losses and
gradients), the compiled loss is one graph with the plain loss's values, and the run-start binary search
equals counting. Run on CPU; tests/dictionary/test_topk_gpu.py repeats the comparisons on CUDA."""

from __future__ import annotations

import math

import pytest
import torch

from featureatlas.schemas.methods import BatchTopKConfig, MatryoshkaConfig, TopKConfig, topk_lr
from featureatlas.tasks.dictionary import build_dictionary, train_dictionary
from featureatlas.tasks.dictionary.sparse_decoder import row_offsets
from featureatlas.tasks.dictionary.topk import TopKSAE
from featureatlas.tasks.dictionary.train import lr_factor, warmup_for
from tests.dictionary.test_topk import plant

D_IN, D_SAE = 32, 64


@pytest.fixture(autouse=True)
def _one_thread():
    """Seeded and single-threaded: at these sizes OpenMP start-up costs more than it saves."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def fresh_sae(cfg_cls=TopKConfig, **fields):
    cfg = cfg_cls(d_sae=D_SAE, k=4, auxk_coef=1.0, **fields)
    sae = build_dictionary(cfg, D_IN)
    sae.init_from_data(plant(2000).acts)
    return sae


def reference_auxk(sae, pre: torch.Tensor, err: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """AuxK as Gao et al. write it: the top min(d_in // 2, n_dead) dead pre-activations, n_dead counted."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return pre.new_zeros(())
    top = pre.masked_fill(~dead, -math.inf).topk(min(D_IN // 2, n_dead), dim=-1)
    codes = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    return (err - codes @ sae.W_dec).pow(2).sum() / err.pow(2).sum()


@pytest.mark.parametrize("n_dead", [0, 3, 16, 50])
def test_fixed_size_auxk_equals_the_counted_one(n_dead):
    # n_dead 3 < k_aux = 16 (live latents fill the selection, at 0), 16 = k_aux, 50 > k_aux
    sae = fresh_sae()
    x = plant(256, data_seed=1).acts * sae.input_scale
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[torch.randperm(D_SAE)[:n_dead]] = True
    err = torch.randn(256, D_IN)
    pre = sae.pre_acts(x)
    got = sae.auxk_loss(pre, err, dead)
    want = reference_auxk(sae, pre, err, dead)
    torch.testing.assert_close(got, want)
    if n_dead:
        (g_got,) = torch.autograd.grad(got, sae.W_enc)
        (g_want,) = torch.autograd.grad(reference_auxk(sae, sae.pre_acts(x), err, dead), sae.W_enc)
        torch.testing.assert_close(g_got, g_want)
    assert sae.auxk_loss(pre, err, None).item() == 0.0  # None: nothing can be dead, no selection made


@pytest.mark.parametrize("cfg_cls", [TopKConfig, BatchTopKConfig, MatryoshkaConfig])
def test_sparse_path_equals_dense_path_with_dead_latents(cfg_cls):
    acts = plant(256, data_seed=2).acts
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[::3] = True
    outs, grads = [], []
    for sparse in (False, True):
        sae = fresh_sae(cfg_cls)
        sae.sparse_decoder = sparse
        out = sae.training_loss(acts, dead)
        out.loss.backward()
        outs.append((out.loss, out.fvu, out.auxk_loss, out.codes))
        grads.append({n: p.grad for n, p in sae.named_parameters() if p.grad is not None})
    assert outs[0][2].item() > 0  # AuxK is active
    for dense_value, sparse_value in zip(*outs):
        torch.testing.assert_close(sparse_value, dense_value, rtol=1e-5, atol=1e-6)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("with_dead", [False, True])
def test_compiled_loss_is_one_graph_with_the_plain_values(with_dead):
    sae = fresh_sae()
    sae.sparse_decoder = False  # what runs under torch.compile (see use_sparse_path)
    acts = plant(128, data_seed=3).acts
    dead = (torch.arange(D_SAE) % 4 == 0) if with_dead else None
    explained = torch._dynamo.explain(sae.training_loss)(acts, dead)
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(sae.training_loss, fullgraph=True, backend="eager")(acts, dead)
    plain = sae.training_loss(acts, dead)
    torch.testing.assert_close(compiled.loss, plain.loss)
    torch.testing.assert_close(compiled.auxk_loss, plain.auxk_loss)
    assert (plain.auxk_loss.item() > 0) == with_dead


def test_row_offsets_by_binary_search_equal_counting():
    rows = torch.tensor([0, 0, 2, 2, 2, 3, 6, 6])  # rows 1, 4, 5 and 7 are empty
    counts = torch.bincount(rows, minlength=8)
    torch.testing.assert_close(row_offsets(rows, 8), torch.cumsum(counts, 0) - counts)


def test_topk_lr_and_warmup_rules():
    cfg = TopKConfig(d_sae=4608, lr=None)
    assert cfg.lr == pytest.approx(4e-4 * math.sqrt(16384 / 4608))
    assert TopKConfig(d_sae=16384, lr=None).lr == pytest.approx(4e-4)
    assert topk_lr(65536) == pytest.approx(2e-4)
    assert TopKConfig(d_sae=4608).lr == cfg.lr  # the default follows the law; an explicit lr as given
    assert TopKConfig(d_sae=4608, lr=4e-4).lr == 4e-4
    assert TopKConfig.model_validate(cfg.model_dump()) == cfg  # dumps carry the number: round trip
    # warm-up: null is 5% of the run, at most 1000 steps; an explicit count as given
    assert warmup_for(None, 245) == 12 and warmup_for(None, 100_000) == 1000 and warmup_for(7, 245) == 7
    factors = [lr_factor(s, 100, None, 0.2) for s in range(1, 101)]
    assert factors[0] == pytest.approx(1 / 5) and factors[4] == 1.0 and factors[79] == 1.0
    assert factors[-1] == pytest.approx(1 / 20)


def dead_after_training(auxk_coef: float) -> float:
    """Train through `train_dictionary` with latents 32-63 sabotaged as in test_topk's AuxK test (zero encoder
    columns, b_enc 0.01: they never win a top-3 slot); the dead share at the end."""
    cfg = TopKConfig(
        d_sae=D_SAE,
        k=3,
        lr=2e-3,
        batch_size=256,
        steps=300,
        dead_tokens=256,
        log_every=25,
        seed=0,
        auxk_coef=auxk_coef,
    )
    original = TopKSAE.init_from_data

    def sabotaged(self, acts, targets=None):
        original(self, acts, targets)
        with torch.no_grad():
            self.W_enc[:, 32:] = 0
            self.b_enc[32:] = 0.01

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(TopKSAE, "init_from_data", sabotaged)
        return train_dictionary(cfg, plant(8192).acts).final_metrics["dead_fraction"]


@pytest.mark.slow
def test_trainer_revives_dead_latents_through_the_host_side_bound():
    """The trainer hands AuxK the dead mask only once its host-side bound says a latent may be dead; the
    latents must still be revived (and stay dead without AuxK)."""
    assert dead_after_training(0.0) == 0.5
    assert dead_after_training(1 / 32) < 0.1


@pytest.mark.parametrize("cfg_cls", [TopKConfig, BatchTopKConfig, MatryoshkaConfig])
def test_fast_and_plain_paths_train_to_the_same_heldout_fvu(cfg_cls):
    """A whole run (the default schedule, AuxK, the decoder constraint) on the sparse path and on the dense
    one: float rounding may move single codes, but the held-out FVU must agree within 1%."""
    truth = plant(8192)
    fresh = plant(2048, data_seed=7).acts
    cfg = cfg_cls(
        d_sae=D_SAE, k=3, lr=2e-3, batch_size=256, steps=150, dead_tokens=1024, log_every=50, device="cpu"
    )
    fvus = []
    for sparse in (False, True):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(TopKSAE, "sparse_decoder", sparse)
            sae = train_dictionary(cfg, truth.acts).dictionary
        with torch.no_grad():
            sse = (fresh - sae(fresh).acts_hat).pow(2).sum()
        fvus.append(float(sse / (fresh - fresh.mean(0)).pow(2).sum()))
    assert fvus[0] < 0.5, f"the plain path barely trained (FVU {fvus[0]:.3f}): the comparison says little"
    assert fvus[1] == pytest.approx(fvus[0], rel=0.01)
