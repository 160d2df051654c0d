"""Transcoders (the TopK family encoding one hookpoint and reconstructing another): a planted sparse linear
map from input to target is recovered; scales are fitted separately and survive save/load; a hand-built
perfect transcoder spliced into a tiny Llama leaves its loss unchanged; the spec refuses what cannot work."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import TypeAdapter
from torch import nn

from featureatlas.schemas.methods import BatchTopKConfig, DictionaryConfig, ReLUConfig, TopKConfig
from featureatlas.schemas.spec import SpecError, parse_spec
from featureatlas.tasks.common.hooks import splice
from featureatlas.tasks.dictionary import build_dictionary, load_dictionary, train_dictionary
from featureatlas.tasks.evaluate.ablation import ablate_latents
from featureatlas.tasks.evaluate.ce_loss import ce_loss_score, next_token_loss_sum
from featureatlas.tasks.evaluate.metrics import reconstruction_metrics
from tests.helpers import build_tiny_llama

D_IN, N_FEATURES, K_TRUE = 32, 64, 3
SOURCE, TARGET = "model.layers.1.post_attention_layernorm", "model.layers.1.mlp"


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def planted_map(n: int, data_seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(acts, targets, target directions): each token's k_true features write `in_dirs` at the input and
    different `out_dirs` at the target; the target lives at another scale and offset (x 5, + 2)."""
    g = torch.Generator().manual_seed(0)
    in_dirs = torch.nn.functional.normalize(torch.randn(N_FEATURES, D_IN, generator=g), dim=-1)
    out_dirs = torch.nn.functional.normalize(torch.randn(N_FEATURES, D_IN, generator=g), dim=-1)
    g = torch.Generator().manual_seed(data_seed)
    active = torch.rand(n, N_FEATURES, generator=g).argsort(-1)[:, :K_TRUE]
    codes = torch.zeros(n, N_FEATURES).scatter(-1, active, torch.rand(n, K_TRUE, generator=g) + 0.5)
    return codes @ in_dirs, 5.0 * (codes @ out_dirs) + 2.0, out_dirs


def transcoder_cfg(method=TopKConfig, **overrides):
    fields = dict(
        hookpoint=SOURCE,
        target_hookpoint=TARGET,
        d_sae=128,
        k=K_TRUE,
        lr=2e-3,
        batch_size=256,
        steps=2000,
        device="cpu",
        log_every=500,
    )
    return method(**(fields | overrides))


def test_planted_sparse_map_is_recovered_and_round_trips(tmp_path):
    acts, targets, out_dirs = planted_map(20_000)
    result = train_dictionary(transcoder_cfg(), acts, targets=targets)
    tc = result.dictionary
    # Each true output direction has a decoder row at cosine > 0.9.
    best = (out_dirs @ tc.decoder_directions().T).max(dim=1).values
    assert (best > 0.9).float().mean() >= 0.85
    # The two sites were scaled apart: the input's mean squared norm is ~1 per dim, the target's far larger.
    assert tc.input_scale.item() == pytest.approx(((acts**2).sum(-1).mean().item() / D_IN) ** -0.5, rel=1e-4)
    assert tc.target_scale.item() == pytest.approx(
        ((targets**2).sum(-1).mean().item() / D_IN) ** -0.5, rel=1e-4
    )
    assert tc.target_scale < tc.input_scale / 3
    fresh_acts, fresh_targets, _ = planted_map(4000, data_seed=7)
    fvu = reconstruction_metrics(tc, fresh_acts, targets=fresh_targets).fvu
    assert fvu < 0.1
    # Judged against its own input instead, the map is far off: the metrics really compare with the target.
    assert reconstruction_metrics(tc, fresh_acts).fvu > 1.0

    folder = tc.save(tmp_path / "tc")
    cfg = json.loads((folder / "cfg.json").read_text())
    assert (cfg["hookpoint"], cfg["target_hookpoint"]) == (SOURCE, TARGET)
    assert cfg["target_scale"] == pytest.approx(tc.target_scale.item())
    loaded = load_dictionary(folder)
    torch.testing.assert_close(loaded(fresh_acts).acts_hat, tc(fresh_acts).acts_hat)


def test_batchtopk_transcoder_trains_on_both_paths_alike():
    acts, targets, _ = planted_map(2048)
    losses = {}
    for sparse in (True, False):
        sae = build_dictionary(transcoder_cfg(BatchTopKConfig, d_sae=64), D_IN)
        sae.init_from_data(acts, targets)
        sae.sparse_decoder = sparse
        out = sae.train().training_loss(acts[:256], torch.zeros(64, dtype=torch.bool), targets[:256])
        out.loss.backward()
        losses[sparse] = (out.loss.detach(), sae.W_enc.grad.clone(), sae.b_dec.grad.clone())
    for a, b in zip(losses[True], losses[False]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("method", "extra"),
    [
        ("relu", {"l1_coef": 1.0}),
        ("jumprelu", {"l0_coef": 0.1, "init_threshold": 0.1, "bandwidth": 0.05}),
        ("gated", {"l1_coef": 1.0}),
        ("threshold", {"tau": 0.3, "use_bias": True}),
    ],
)
def test_linear_sae_methods_train_as_transcoders(method, extra):
    # Short runs: these methods need more steps than TopK to recover the map, but a method that ignored its
    # target (reconstructing its input) would score an FVU of ~45 against the target here, not below 0.8.
    acts, targets, _ = planted_map(8000)
    fields = {"method": method, "hookpoint": SOURCE, "target_hookpoint": TARGET, "d_sae": 128, "lr": 2e-3}
    fields |= {"batch_size": 256, "steps": 300, "device": "cpu", "log_every": 100} | extra
    cfg = TypeAdapter(DictionaryConfig).validate_python(fields)
    tc = train_dictionary(cfg, acts, targets=targets).dictionary
    assert tc.is_transcoder and tc.target_scale < tc.input_scale / 3
    fresh_acts, fresh_targets, _ = planted_map(2000, data_seed=7)
    assert reconstruction_metrics(tc, fresh_acts, targets=fresh_targets).fvu < 0.8


def test_plain_sae_keeps_one_scale_and_old_cfg_loads(tmp_path):
    acts, _, _ = planted_map(1000)
    sae = build_dictionary(TopKConfig(d_sae=64, k=3), D_IN)
    sae.init_from_data(acts * 3)
    assert sae.target_scale.item() == pytest.approx(sae.input_scale.item())
    folder = sae.save(tmp_path / "sae")
    raw = json.loads((folder / "cfg.json").read_text())
    assert "target_hookpoint" not in raw  # unset: neither in cfg.json nor in the fingerprint
    del raw["target_scale"]  # as written before transcoders existed
    (folder / "cfg.json").write_text(json.dumps(raw))
    loaded = load_dictionary(folder)
    assert loaded.target_scale.item() == pytest.approx(sae.input_scale.item())


def test_training_refuses_missing_or_unexpected_targets():
    acts, targets, _ = planted_map(512)
    with pytest.raises(ValueError, match="trains on paired input and target"):
        train_dictionary(transcoder_cfg(steps=2), acts)
    with pytest.raises(ValueError, match="only a transcoder does"):
        train_dictionary(TopKConfig(d_sae=64, k=3, steps=2, device="cpu"), acts, targets=targets)
    with pytest.raises(ValueError, match="of the same tokens"):
        train_dictionary(transcoder_cfg(steps=2), acts, targets=targets[:100])


def test_config_and_spec_refuse_what_cannot_work():
    with pytest.raises(ValueError, match="cannot be trained as a transcoder"):
        TypeAdapter(DictionaryConfig).validate_python(
            {"method": "gba", "hookpoint": SOURCE, "target_hookpoint": TARGET}
        )
    with pytest.raises(ValueError, match="equals hookpoint"):
        ReLUConfig(hookpoint=SOURCE, target_hookpoint=SOURCE)
    with pytest.raises(ValueError, match="needs `hookpoint`"):
        TopKConfig(target_hookpoint=TARGET)
    spec = {
        "model": {"path": "m"},
        "hookpoints": [SOURCE],
        "dictionaries": [{"method": "topk", "hookpoint": SOURCE, "target_hookpoint": TARGET}],
    }
    with pytest.raises(SpecError, match="both sites cached"):
        parse_spec(spec)
    assert parse_spec(spec | {"hookpoints": [SOURCE, TARGET]}).dictionaries[0].target_hookpoint == TARGET


# ---- splicing a perfect transcoder -------------------------------------------------------------------------


def linear_mlp_llama(A: torch.Tensor) -> nn.Module:
    """A tiny Llama whose layer-1 MLP is the known linear map x -> x @ A.T."""
    model = build_tiny_llama(seed=0, initializer_range=0.3)
    mlp = nn.Linear(A.shape[1], A.shape[0], bias=False)
    with torch.no_grad():
        mlp.weight.copy_(A)
    model.model.layers[1].mlp = mlp
    return model.eval()


def perfect_transcoder(A: torch.Tensor, method: str = "topk"):
    """x -> x @ A.T exactly: latents relu(x_i) and relu(-x_i) (W_enc = [I, -I]), decoded by +-A.T's rows.

    A token has at most d nonzero latents of the 2d (one per dimension), so top-k with k = d keeps them all;
    a ReLU SAE with zero biases computes the same codes.
    """
    d = A.shape[0]
    fields = {"method": method, "hookpoint": SOURCE, "target_hookpoint": TARGET, "d_sae": 2 * d}
    if method == "topk":
        fields["k"] = d
    tc = build_dictionary(TypeAdapter(DictionaryConfig).validate_python(fields), d)
    eye = torch.eye(d)
    with torch.no_grad():
        tc.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        tc.W_dec.copy_(torch.cat([A.T, -A.T], dim=0))
        tc.b_enc.zero_()
        tc.b_dec.zero_()
    return tc.eval()


@pytest.mark.parametrize("method", ["topk", "relu"])
def test_perfect_transcoder_splice_leaves_the_loss_unchanged(method):
    d = 32  # the tiny Llama's hidden size
    A = torch.randn(d, d, generator=torch.Generator().manual_seed(5)) / d**0.5
    model, tc = linear_mlp_llama(A), perfect_transcoder(A, method)
    ids = torch.randint(1, 320, (4, 12), generator=torch.Generator().manual_seed(3))

    result = ce_loss_score(model, tc, TARGET, ids, source_hookpoint=SOURCE)
    assert result.ce_loss_zero != pytest.approx(result.ce_loss_clean, abs=1e-3)  # the MLP matters
    assert result.ce_loss_spliced == pytest.approx(result.ce_loss_clean, abs=1e-5)
    assert result.ce_loss_score == pytest.approx(1.0, abs=1e-4)
    assert result.kl_spliced == pytest.approx(0.0, abs=1e-6)

    # Fed the target's own output instead of the input site's, the same map is wrong: the loss moves.
    wrong = ce_loss_score(model, tc, TARGET, ids)
    assert abs(wrong.ce_loss_spliced - wrong.ce_loss_clean) > 1e-3


def test_transcoder_splice_refuses_a_downstream_input():
    d = 32
    A = torch.eye(d)
    model, tc = linear_mlp_llama(A), perfect_transcoder(A)
    ids = torch.randint(1, 320, (2, 8), generator=torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match="upstream"):
        ce_loss_score(model, tc, "model.layers.0.mlp", ids, source_hookpoint=SOURCE)


def test_transcoder_latent_ablation_acts_at_the_target_with_codes_from_the_input():
    # With the perfect transcoder of the linear MLP, latent j is relu(x_j) and writes relu(x_j) * A[:, j]:
    # removing it at the MLP's output equals zeroing relu(x_j) in the MLP's input, which the reference run
    # does directly at the input site (it feeds only the MLP).
    d, j = 32, 5
    A = torch.randn(d, d, generator=torch.Generator().manual_seed(5)) / d**0.5
    model, tc = linear_mlp_llama(A), perfect_transcoder(A)
    ids = torch.randint(1, 320, (4, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    (result,) = ablate_latents(
        model, tc, TARGET, ids, mask, [j], exclude_first_token=False, source_hookpoint=SOURCE
    )

    def drop_positive_part(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[..., j] -= x[..., j].relu()
        return x

    with torch.no_grad():
        clean, count = next_token_loss_sum(model(input_ids=ids).logits, ids, mask)
        with splice(model, SOURCE, drop_positive_part):
            ablated, _ = next_token_loss_sum(model(input_ids=ids).logits, ids, mask)
    assert abs(result.loss_change) > 1e-4
    assert result.loss_change == pytest.approx((ablated - clean) / count, rel=1e-4, abs=1e-7)
