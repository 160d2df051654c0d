"""The SAE variants (relu, batchtopk, matryoshka, jumprelu, gated, threshold): hand-worked
activations on 2-4 dimensional weights, straight-through gradients, the batchtopk inference threshold,
threshold-SAE exact recovery, save/load round trips, and pipeline-spec validation."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import TypeAdapter, ValidationError

from featureatlas.schemas.methods import (
    BatchTopKConfig,
    DictionaryConfig,
    GatedConfig,
    JumpReLUConfig,
    MatryoshkaConfig,
    ReLUConfig,
    ThresholdConfig,
)
from featureatlas.schemas.spec import parse_spec
from featureatlas.tasks.dictionary import build_dictionary, load_dictionary, train_dictionary
from featureatlas.tasks.dictionary.synthetic import recovery_at_init
from tests.dictionary.test_topk import plant

VARIANTS = ("relu", "batchtopk", "matryoshka", "jumprelu", "gated", "threshold")


@pytest.fixture(autouse=True)
def _one_thread():
    """At these sizes OpenMP start-up costs more than it saves, and the test machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def set_weights(sae, W_enc, W_dec=None, **tensors) -> None:
    """Hand-set weights; W_dec defaults to W_enc.T, other parameters and buffers by name."""
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor(W_enc))
        sae.W_dec.copy_(torch.tensor(W_dec) if W_dec is not None else sae.W_enc.T)
        for name, value in tensors.items():
            getattr(sae, name).copy_(torch.tensor(value))


EYE3 = [[1.0, 0, 0], [0, 1, 0], [0, 0, 1]]


# ---- relu --------------------------------------------------------------------------------------------------


def test_relu_hand_worked():
    # Decoder rows e1, e2, (0.6, 0.8); W_enc = W_dec.T; b_enc = (0, -0.5, -1); b_dec = 0.
    # x = (1, 2): pre = (1, 2 - 0.5, 0.6 + 1.6 - 1) = (1, 1.5, 1.2), all positive -> codes unchanged.
    #   decode: (1, 0) + 1.5 (0, 1) + 1.2 (0.6, 0.8) = (1.72, 2.46).
    # x = (-1, 0.5): pre = (-1, 0, -0.6 + 0.4 - 1) = (-1, 0, -1.2) -> codes 0; decode b_dec = (0, 0).
    sae = build_dictionary(ReLUConfig(d_sae=3), d_in=2)
    set_weights(sae, [[1.0, 0, 0.6], [0, 1, 0.8]], b_enc=[0.0, -0.5, -1.0])
    out = sae(torch.tensor([[1.0, 2.0], [-1.0, 0.5]]))
    torch.testing.assert_close(out.codes, torch.tensor([[1.0, 1.5, 1.2], [0, 0, 0]]))
    torch.testing.assert_close(out.acts_hat, torch.tensor([[1.72, 2.46], [0.0, 0.0]]))


def test_relu_penalty_plain_and_scaled_by_decoder_norms():
    # codes (1, 1.5, 3.2) with decoder row norms (1, 1, 2): plain L1 = 5.7, scaled = 1 + 1.5 + 6.4 = 8.9.
    codes = torch.tensor([[1.0, 1.5, 3.2]])
    W_dec = [[1.0, 0], [0, 1], [1.2, 1.6]]
    for scaled, expected in ((False, 5.7), (True, 8.9)):
        sae = build_dictionary(ReLUConfig(d_sae=3, scaled_l1=scaled), d_in=2)
        set_weights(sae, [[1.0, 0, 0.6], [0, 1, 0.8]], W_dec=W_dec)
        assert sae.sparsity_penalty(codes).item() == pytest.approx(expected)
        assert sae.unit_norm_decoder is not scaled


def test_relu_l1_warms_up_linearly():
    sae = build_dictionary(ReLUConfig(d_sae=4, l1_coef=2.0, l1_warmup_steps=4), d_in=2)
    weights = []
    for _ in range(6):
        weights.append(sae.l1_weight())
        sae.after_optimizer_step()
    assert weights == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]


def test_scaled_l1_leaves_decoder_unconstrained_and_encoder_starts_as_its_transpose():
    cfg = ReLUConfig(d_sae=64, scaled_l1=True, l1_coef=1.0, lr=1e-2, batch_size=128, steps=30, device="cpu")
    fresh = build_dictionary(cfg, d_in=32)
    torch.testing.assert_close(fresh.W_enc, fresh.W_dec.T)
    sae = train_dictionary(cfg, plant(1000).acts).dictionary
    norms = sae.W_dec.norm(dim=-1)
    assert (norms - 1).abs().max() > 1e-3  # rows moved off the sphere
    torch.testing.assert_close(sae.decoder_directions().norm(dim=-1), torch.ones(64))


# ---- batchtopk and matryoshka ------------------------------------------------------------------------------


def test_batchtopk_shares_the_budget_across_the_batch_and_learns_its_threshold():
    # Identity weights, k = 1, two tokens: the batch keeps its 2 largest values, 3 and 2, both from token A;
    # token B (max 1) gets none, where TopK would have given it one. The threshold becomes the smallest
    # kept value, 2. At inference, codes strictly above 2 survive: A -> (3, 0, 0), B -> 0.
    sae = build_dictionary(BatchTopKConfig(d_sae=3, k=1, threshold_beta=0.5), d_in=3)
    set_weights(sae, EYE3)
    acts = torch.tensor([[3.0, 2.0, 0.5], [1.0, 0.2, 0.1]])
    sae.train()
    torch.testing.assert_close(sae.encode(acts), torch.tensor([[3.0, 2.0, 0], [0, 0, 0]]))
    assert sae.threshold.item() == 2.0
    sae.eval()
    torch.testing.assert_close(sae.encode(acts), torch.tensor([[3.0, 0, 0], [0, 0, 0]]))
    # Second batch keeps 1.5 and 1.0 (smallest 1.0). Before any optimizer step the decay is 1/50, so the
    # first batch is nearly forgotten: 0.02 * 2 + 0.98 * 1 = 1.02.
    sae.train()
    sae.encode(torch.tensor([[1.5, 0, 0], [0, 1.0, 0]]))
    assert sae.threshold.item() == pytest.approx(1.02)
    # Late in training the configured decay (0.5 here) applies: 0.5 * 1.02 + 0.5 * 1.0 = 1.01.
    sae.steps_taken = 10_000
    sae.encode(torch.tensor([[1.5, 0, 0], [0, 1.0, 0]]))
    assert sae.threshold.item() == pytest.approx(1.01)


def test_batchtopk_threshold_is_trained_and_saved(tmp_path):
    cfg = BatchTopKConfig(d_sae=64, k=3, lr=2e-3, batch_size=128, steps=40, device="cpu")
    acts = plant(2000).acts
    sae = train_dictionary(cfg, acts).dictionary
    assert sae.threshold.item() > 0
    loaded = load_dictionary(sae.save(tmp_path / "btk"))
    assert loaded.threshold.item() == sae.threshold.item()
    # The inference rule keeps about k codes per token on average.
    assert 1.5 < (loaded.encode(acts) > 0).sum(-1).float().mean().item() < 6


@pytest.mark.parametrize("method", ["batchtopk", "matryoshka"])
def test_inference_threshold_keeps_about_k_codes_on_held_out_tokens_early(method, tmp_path):
    # The threshold must track the trained model, not the random initialisation's large kept codes: after
    # 300 steps the held-out L0 through the inference path (threshold) is within 10% of k, and the SAELens
    # export (a jumprelu file) carries that threshold.
    from featureatlas.tasks.dictionary.saelens import export_saelens, import_saelens
    from featureatlas.tasks.evaluate.metrics import reconstruction_metrics

    cfg = variant_cfg(method, d_sae=128, k=4, batch_size=256, steps=300, log_every=300)
    train, held_out = plant(20_000, k_true=4).acts, plant(4000, k_true=4, data_seed=99).acts
    sae = train_dictionary(cfg, train).dictionary
    l0 = reconstruction_metrics(sae, held_out).l0
    assert abs(l0 - 4) <= 0.4, l0
    exported = import_saelens(export_saelens(sae, tmp_path / "sl"))
    with torch.no_grad():
        assert torch.equal(exported.encode(held_out) > 0, sae.encode(held_out) > 0)


def test_matryoshka_prefix_reconstructions_hand_worked():
    # d_sae 4 in 3 dims, prefixes (2, 4); rows e1, e2, e3, (1, 1, 0); b_dec = (0, 0, 1); codes (1, 2, 3, 4).
    #   prefix 2: 1 e1 + 2 e2 + b_dec = (1, 2, 1); full: + 3 e3 + 4 (1, 1, 0) = (5, 6, 4).
    sae = build_dictionary(MatryoshkaConfig(d_sae=4, k=1, prefixes=(2, 4)), d_in=3)
    W_dec = [[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]]
    set_weights(sae, [list(r) for r in zip(*W_dec)], W_dec=W_dec, b_dec=[0.0, 0, 1])
    recons = sae.prefix_reconstructions(torch.tensor([[1.0, 2, 3, 4]]))
    torch.testing.assert_close(torch.cat(recons), torch.tensor([[1.0, 2, 1], [5, 6, 4]]))


def test_matryoshka_prefixes_are_validated_with_the_fix():
    with pytest.raises(ValidationError, match="end at d_sae=64"):
        MatryoshkaConfig(d_sae=64, k=4, prefixes=(16, 32))
    assert MatryoshkaConfig(d_sae=64, k=4).prefix_sizes() == (8, 16, 32, 64)


# ---- jumprelu ----------------------------------------------------------------------------------------------


def test_jumprelu_forward_and_straight_through_gradients():
    # Identity encoder, thresholds (0.5, 1, 2), bandwidth 0.4, x = (0.6, 0.9, 2.5).
    #   codes: 0.6 > 0.5 fires, 0.9 < 1 does not, 2.5 > 2 fires -> (0.6, 0, 2.5).
    #   Kernel K((x - theta)/eps)/eps is 1/0.4 = 2.5 where |x - theta| < 0.2: latents 0 (0.1) and 1 (0.1),
    #   not latent 2 (0.5). d sum(codes)/d theta = -theta * 2.5 -> (-1.25, -2.5, 0);
    #   d sum(codes)/d pre = 1[fires] -> (1, 0, 1); d L0/d theta = -2.5 -> (-2.5, -2.5, 0).
    sae = build_dictionary(JumpReLUConfig(d_sae=3, bandwidth=0.4, init_threshold=0.5), d_in=3)
    set_weights(sae, EYE3, threshold=[0.5, 1.0, 2.0])
    pre = torch.tensor([[0.6, 0.9, 2.5]], requires_grad=True)
    codes = sae.activation(pre)
    torch.testing.assert_close(codes.detach(), torch.tensor([[0.6, 0.0, 2.5]]))
    codes.sum().backward()
    torch.testing.assert_close(pre.grad, torch.tensor([[1.0, 0.0, 1.0]]))
    torch.testing.assert_close(sae.threshold.grad, torch.tensor([-1.25, -2.5, 0.0]))
    sae.threshold.grad = None
    l0 = sae.sparsity_penalty(pre, codes)
    assert l0.item() == 2.0
    l0.backward()
    torch.testing.assert_close(sae.threshold.grad, torch.tensor([-2.5, -2.5, 0.0]))


def test_jumprelu_tanh_penalty_hand_worked():
    # codes (0.6, 0, 2.5), unit rows, c = 4: tanh(2.4) + 0 + tanh(10).
    sae = build_dictionary(JumpReLUConfig(d_sae=3, sparsity="tanh", tanh_c=4.0), d_in=3)
    set_weights(sae, EYE3)
    codes = torch.tensor([[0.6, 0.0, 2.5]])
    assert sae.sparsity_penalty(codes, codes).item() == pytest.approx(math.tanh(2.4) + math.tanh(10.0))


@pytest.mark.parametrize("sparsity", ["step", "tanh"])
def test_jumprelu_threshold_moves_under_the_optimizer(sparsity):
    cfg = JumpReLUConfig(
        d_sae=64,
        sparsity=sparsity,
        lr=2e-3,
        batch_size=128,
        steps=60,
        device="cpu",
        init_threshold=0.1,
        bandwidth=0.05,
    )
    sae = train_dictionary(cfg, plant(2000).acts).dictionary
    moved = (sae.threshold.detach() - 0.1).abs()
    # Adam moves a parameter with a steady gradient by about lr per step: 60 steps -> up to ~0.12.
    assert moved.max().item() > 0.02 and (moved > 1e-4).float().mean().item() > 0.5
    assert sae.threshold.min().item() > 0


def test_jumprelu_sparsity_weight_warms_up_linearly():
    # l0_coef 2 over 4 warm-up steps: weight 2 * (steps_taken + 1) / 4 -> 0.5, 1.0, 1.5, 2.0, then 2.0.
    sae = build_dictionary(JumpReLUConfig(d_sae=3, l0_coef=2.0, l0_warmup_steps=4), d_in=3)
    weights = []
    for step in range(5):
        sae.steps_taken = step
        weights.append(sae.l0_weight())
    assert weights == [0.5, 1.0, 1.5, 2.0, 2.0]
    assert build_dictionary(JumpReLUConfig(d_sae=3, l0_coef=2.0), d_in=3).l0_weight() == 2.0


def test_jumprelu_bandwidth_wider_than_threshold_is_refused():
    with pytest.raises(ValidationError, match="lower bandwidth or raise init_threshold"):
        JumpReLUConfig(bandwidth=1.0, init_threshold=0.1)


# ---- gated -------------------------------------------------------------------------------------------------


def test_gated_hand_worked():
    # Identity W_enc (2 x 2), gate bias (0, -1), r_mag (ln 2, 0), b_mag (0, 0.5).
    #   x = (1, 0.5): pi_gate = (1, -0.5), pi_mag = (2, 1) -> codes (2, 0): latent 1's gate is shut.
    #   x = (-1, 3): pi_gate = (-1, 2), pi_mag = (-2, 3.5) -> codes (0, 3.5).
    sae = build_dictionary(GatedConfig(d_sae=2), d_in=2)
    set_weights(sae, [[1.0, 0], [0, 1]], b_enc=[0.0, -1.0], r_mag=[math.log(2.0), 0.0], b_mag=[0.0, 0.5])
    codes = sae.encode(torch.tensor([[1.0, 0.5], [-1.0, 3.0]]))
    torch.testing.assert_close(codes, torch.tensor([[2.0, 0.0], [0.0, 3.5]]))


def test_gated_gate_path_learns_through_the_auxiliary_loss_only():
    sae = build_dictionary(GatedConfig(d_sae=8, l1_coef=0.0), d_in=4)
    acts = torch.randn(32, 4)
    sae.init_from_data(acts)
    sae.training_loss(acts, torch.zeros(8, dtype=torch.bool)).loss.backward()
    # b_enc (gate bias) only enters through relu(pi_gate) in the aux loss and the L1: it gets a gradient.
    assert sae.b_enc.grad.abs().max() > 0 and sae.b_mag.grad.abs().max() > 0


# ---- threshold ---------------------------------------------------------------------------------------------


def test_threshold_hand_worked():
    # Identity weights, tau 0.5: x = (0.5, 0.4, -1) -> (0.5, 0, 0) (the indicator includes equality);
    # x = (2, 0.6, 0.49) -> (2, 0.6, 0): no shrinkage of what passes, unlike a biased ReLU.
    sae = build_dictionary(ThresholdConfig(d_sae=3, tau=0.5), d_in=3)
    set_weights(sae, EYE3)
    codes = sae.encode(torch.tensor([[0.5, 0.4, -1.0], [2.0, 0.6, 0.49]]))
    torch.testing.assert_close(codes, torch.tensor([[0.5, 0, 0], [2.0, 0.6, 0]]))


def test_threshold_exact_recovery_with_ideal_weights_inside_the_window():
    # 16 orthonormal features, 3 active per token at magnitudes in [0.5, 1.5), plus noise of at most 0.01
    # per feature direction. The admissible window is (0.01, 0.49]: above every inactive pre-activation and
    # below every active one. Inside it the support is exact and the codes equal the truth up to the noise.
    d = 16
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(0)))
    g = torch.Generator().manual_seed(1)
    active = torch.rand(500, d, generator=g).argsort(-1)[:, :3]
    truth = torch.zeros(500, d).scatter(-1, active, torch.rand(500, 3, generator=g) + 0.5)
    noise = (torch.rand(500, d, generator=g) - 0.5) * 0.02
    acts = (truth + noise) @ q.T  # row i of q.T is feature i
    for tau, exact in ((0.05, True), (0.45, True), (0.6, False), (0.005, False)):
        sae = build_dictionary(ThresholdConfig(d_sae=d, tau=tau), d_in=d)
        set_weights(sae, q.tolist(), W_dec=q.T.tolist())
        codes = sae.encode(acts)
        same_support = torch.equal(codes != 0, truth != 0)
        assert same_support is exact, tau
        if exact:
            torch.testing.assert_close(codes, truth, atol=0.0101, rtol=0)
    # Without noise the recovery is exact to float precision, reconstruction included.
    sae = build_dictionary(ThresholdConfig(d_sae=d, tau=0.3), d_in=d)
    set_weights(sae, q.tolist(), W_dec=q.T.tolist())
    out = sae(truth @ q.T)
    torch.testing.assert_close(out.codes, truth, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.acts_hat, truth @ q.T, atol=1e-5, rtol=0)


def test_threshold_tau_is_fitted_from_the_initial_pre_activations(tmp_path):
    acts = torch.tensor([[0.0, 0, 0], [1, 1, 1], [2, 2, -2], [4, -4, 0]])
    sae = build_dictionary(ThresholdConfig(d_sae=3), d_in=3)
    assert sae.cfg.tau is None
    with pytest.raises(ValueError, match="call init_from_data"):
        sae.encode(acts)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(3))  # identity encoder, bias-free: pre-activations = the scaled entries
    sae.init_from_data(acts)
    # Mean squared norm (0 + 3 + 12 + 32) / 4 = 11.75, so the scale is s = sqrt(3 / 11.75). The 12 entries
    # sorted: -4 -2 0 0 0 0 1 1 1 2 2 4 (times s); median (lower middle) 0; absolute deviations sorted
    # 0 0 0 0 1 1 1 2 2 2 4 4, median 1 (times s). tau = 2 x 1.4826 x s.
    assert sae.fitted_tau.item() == pytest.approx(2 * 1.4826 * math.sqrt(3 / 11.75), rel=1e-6)
    # An explicit tau is kept as given; the fitted one is saved in cfg.json and restored on load.
    assert build_dictionary(ThresholdConfig(d_sae=3, tau=0.7), d_in=3).fitted_tau.item() == pytest.approx(0.7)
    loaded = load_dictionary(sae.save(tmp_path / "thr"))
    assert loaded.fitted_tau.item() == pytest.approx(sae.fitted_tau.item())
    assert loaded.cfg.tau is None
    torch.testing.assert_close(loaded.encode(acts), sae.encode(acts))


def test_threshold_bias_free_by_default():
    cfg = ThresholdConfig(d_sae=32, tau=0.3, lr=2e-3, batch_size=128, steps=10, device="cpu")
    sae = train_dictionary(cfg, plant(500).acts + 3.0).dictionary
    assert sae.b_dec.abs().max() == 0 and sae.b_enc.abs().max() == 0


# ---- every variant: persistence, specs ---------------------------------------------------------------------


def variant_cfg(method: str, **overrides):
    fields = dict(method=method, d_sae=64, lr=2e-3, batch_size=128, steps=20, device="cpu", log_every=10)
    if method in ("batchtopk", "matryoshka"):
        fields["k"] = 3
    return TypeAdapter(DictionaryConfig).validate_python(fields | overrides)


@pytest.mark.parametrize("method", VARIANTS)
def test_save_load_round_trip(method, tmp_path):
    acts = plant(1000).acts * 3.0
    result = train_dictionary(variant_cfg(method), acts)
    assert set(result.final_metrics) >= {"loss", "fvu", "l0", "lr"}
    sae = result.dictionary
    loaded = load_dictionary(sae.save(tmp_path / method))
    assert type(loaded) is type(sae) and loaded.cfg == sae.cfg and loaded.method == method
    for name, tensor in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    with torch.no_grad():
        assert torch.equal(loaded.encode(acts), sae.encode(acts))
        assert torch.equal(loaded.decode(loaded.encode(acts)), sae.decode(sae.encode(acts)))
    assert sorted(p.name for p in (tmp_path / method).iterdir()) == ["cfg.json", "weights.safetensors"]


@pytest.mark.parametrize("method", VARIANTS)
def test_pipeline_spec_accepts_every_variant(method):
    extra = {"k": 4} if method in ("batchtopk", "matryoshka") else {}
    spec = parse_spec(
        {
            "model": {"path": "some/model"},
            "hookpoints": ["model.layers.1"],
            "dictionaries": [{"method": method, "d_sae": 64} | extra],
        }
    )
    assert spec.dictionaries[0].method == method


# ---- planted-dictionary recovery ---------------------------------------------------------------------------
# Only the TopK family is asserted: at these tiny sizes and step counts it recovers the planted dictionary on
# every seed tried (0-2, planted apart from the init: batchtopk 1.0 / 0.98 / 0.92, matryoshka 0.83 / 0.88 /
# 0.86 at cosine 0.8). relu, jumprelu, gated and threshold were seen to recover it on some seeds and not
# others when the planted rows were the init rows; not re-measured since (they need their sparsity weight
# tuned and more steps).


@pytest.mark.parametrize(("method", "floor"), [("batchtopk", 0.9), ("matryoshka", 0.8)])
def test_topk_family_recovers_planted_dictionary(method, floor):
    truth = plant(8000)
    # the floors were measured with a constant lr and b_dec at the mean, not the TopK family's defaults
    schedule = {"warmup_steps": 0, "decay_fraction": 0.0, "b_dec_init": "mean"}
    cfg = variant_cfg(method, d_sae=128, lr=4e-3, batch_size=256, steps=400, log_every=400, **schedule)
    assert recovery_at_init(cfg, truth.acts, truth.directions)["frr_08"] < 0.2  # not handed the answer
    sae = train_dictionary(cfg, truth.acts).dictionary
    best = (truth.directions @ sae.decoder_directions().T).max(dim=1).values
    assert (best > 0.8).float().mean().item() >= floor


# ---- recovery at the documented defaults (only d_sae, steps and batch size given) ------------------------


# 32 features in 16 dimensions, 3 per token. Measured (cosine 0.8): threshold 0.75 at 3000 steps (L0 1.2);
# jumprelu 1.0 at 3000 (dictionary seeds 1, 2: 0.88, 0.94; 0.84 at the former lr 4e-4, 0.22 with the former
# threshold 0.1 and bandwidth 0.05); topk (k 3) 1.0 at 3000.
@pytest.mark.parametrize(
    ("method", "steps", "floor"),
    [("threshold", 3000, 0.6), ("jumprelu", 3000, 0.85)],
)
def test_recovers_planted_dictionary_at_defaults(method, steps, floor):
    truth = plant(12_000, d_in=16, n_features=32, k_true=3)
    cfg = TypeAdapter(DictionaryConfig).validate_python(
        dict(method=method, d_sae=64, batch_size=128, steps=steps, device="cpu", log_every=steps)
    )
    assert recovery_at_init(cfg, truth.acts, truth.directions)["frr_08"] < 0.2  # not handed the answer
    sae = train_dictionary(cfg, truth.acts).dictionary
    best = (truth.directions @ sae.decoder_directions().T).max(dim=1).values
    assert (best > 0.8).float().mean().item() >= floor
