"""Matching-pursuit SAE: pursuit worked by hand, early stopping, error non-increasing in the steps, gradients
through the selected scores, planted recovery, persistence and spec validation."""

from __future__ import annotations

import pytest
import torch

from featureatlas.schemas.methods import MPConfig
from featureatlas.schemas.spec import SpecError, parse_spec
from featureatlas.tasks.dictionary import build_dictionary, load_dictionary, train_dictionary
from featureatlas.tasks.dictionary.mp import MPSAE
from featureatlas.tasks.dictionary.synthetic import hierarchical_toy, recovery_at_init
from tests.dictionary.test_topk import plant


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def hand_set_mp(**overrides) -> MPSAE:
    """d_in 2, d_sae 3, atoms e1, e2, (0.6, 0.8); b_dec 0."""
    sae = build_dictionary(MPConfig(**({"d_sae": 3, "k": 3, "device": "cpu"} | overrides)), d_in=2)
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor([[1.0, 0], [0, 1], [0.6, 0.8]]))
    return sae


# x = (1, 2). Step 1: scores relu(1, 2, 0.6 + 1.6) = (1, 2, 2.2): atom 2 takes 2.2;
#   r = (1, 2) - 2.2 * (0.6, 0.8) = (-0.32, 0.24).
# Step 2: scores relu(-0.32, 0.24, -0.192 + 0.192) = (0, 0.24, 0): atom 1 takes 0.24; r = (-0.32, 0).
# Step 3: scores relu(-0.32, 0, -0.192) are all 0: nothing changes.
# Codes (0, 0.24, 2.2); x_hat = 0.24 * e2 + 2.2 * (0.6, 0.8) = (1.32, 2.0).
X = torch.tensor([[1.0, 2.0]])


def test_pursuit_hand_worked():
    sae = hand_set_mp()
    out = sae(X)
    torch.testing.assert_close(out.codes, torch.tensor([[0.0, 0.24, 2.2]]))
    torch.testing.assert_close(out.acts_hat, torch.tensor([[1.32, 2.0]]))
    # One step at inference: only atom 2.
    torch.testing.assert_close(sae.encode(X, k=1), torch.tensor([[0.0, 0, 2.2]]))


def test_residual_threshold_stops_early():
    # ||x|| = sqrt(5) = 2.236; after step 1 ||r|| = 0.4 <= 0.5 * 2.236: the token stops after one atom.
    sae = hand_set_mp(residual_threshold=0.5)
    torch.testing.assert_close(sae.encode(X), torch.tensor([[0.0, 0, 2.2]]))


def test_error_never_increases_with_more_steps():
    acts = plant(500, d_in=16, n_features=48, k_true=6).acts
    sae = build_dictionary(MPConfig(d_sae=48, k=4), d_in=16)
    sae.init_from_data(acts)
    with torch.no_grad():
        errors = [(sae.decode(sae.encode(acts, k=k)) - acts).pow(2).sum(-1) for k in range(1, 13)]
    for fewer, more in zip(errors, errors[1:]):
        assert bool((more <= fewer + 1e-5).all())
    assert errors[-1].mean() < 0.5 * errors[0].mean()


def test_gradients_reach_only_selected_atoms():
    sae = hand_set_mp(k=1)
    out = sae.training_loss(torch.tensor([[1.0, 2.0], [1.1, 2.1]]), torch.zeros(3, dtype=torch.bool))
    out.loss.backward()
    # Both tokens pick atom 2 alone: atoms 0 and 1 take no part in the reconstruction.
    assert sae.W_dec.grad[:2].abs().max() == 0 and sae.W_dec.grad[2].abs().max() > 0


def test_recovers_planted_dictionary_and_round_trips(tmp_path):
    # `plant` draws its directions apart from the generator that draws the initial atoms (with the same seed
    # the first 32 atoms were the answer before any training: share 1.0 at init); the guard keeps it so.
    truth = plant(8000, d_in=16, n_features=32, k_true=3)
    cfg = MPConfig(d_sae=64, k=3, lr=3e-3, batch_size=256, steps=300, device="cpu")
    assert recovery_at_init(cfg, truth.acts, truth.directions)["frr_08"] < 0.2  # not handed the answer
    sae = train_dictionary(cfg, truth.acts).dictionary
    best = (truth.directions @ sae.decoder_directions().T).max(dim=1).values
    assert (best > 0.9).float().mean().item() >= 0.9
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(64))

    sae.save(tmp_path / "mp")
    loaded = load_dictionary(tmp_path / "mp")
    assert type(loaded) is MPSAE and loaded.cfg == sae.cfg
    with torch.no_grad():
        assert torch.equal(loaded.encode(truth.acts[:100], k=5), sae.encode(truth.acts[:100], k=5))


def test_spec_accepts_mp_and_refuses_k_above_d_sae():
    base = {"model": {"path": "m"}, "hookpoints": ["h"]}
    assert parse_spec(base | {"dictionaries": [{"method": "mp", "k": 8}]}).dictionaries[0].k == 8
    with pytest.raises(SpecError, match="k <= d_sae"):
        parse_spec(base | {"dictionaries": [{"method": "mp", "d_sae": 4, "k": 8}]})


def test_hierarchical_toy_error_non_increasing_in_steps():
    # Trained on mutually exclusive parents with mutually exclusive children (plus singletons): every extra
    # pursuit step at inference lowers or keeps each token's error, past the training k = 3 as well.
    toy = hierarchical_toy(3000, d_in=16, n_parents=3, n_children=3, n_singletons=4, seed=1)
    cfg = MPConfig(d_sae=32, k=3, lr=3e-3, batch_size=128, steps=60, device="cpu")
    sae = train_dictionary(cfg, toy.acts).dictionary
    x = toy.acts[:400]
    with torch.no_grad():
        errors = [(sae.decode(sae.encode(x, k=k)) - x).pow(2).sum(-1) for k in range(1, 11)]
    for fewer, more in zip(errors, errors[1:]):
        assert bool((more <= fewer + 1e-5).all())
    means = [e.mean().item() for e in errors]
    assert means[2] < 0.5 * means[0] and means[-1] < means[2]  # steps past the training k still help
    # Training moved the atoms towards the planted parents (recovery vs BatchTopK: bench_recovery.py).
    untrained = build_dictionary(cfg, d_in=16).decoder_directions()
    cos = lambda D: (toy.parents @ D.T).max(dim=1).values.mean().item()  # noqa: E731
    assert cos(sae.decoder_directions()) > cos(untrained) + 0.1


def reference_training_loss(sae: MPSAE, acts: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The literal pursuit loop under autograd (the module's earlier implementation): codes and FVU loss."""
    x = acts.to(sae.W_dec.dtype) * sae.input_scale
    atoms = sae.atoms()
    r = x - sae.b_dec
    stop_norm = sae.cfg.residual_threshold * r.detach().norm(dim=-1)
    codes = r.new_zeros(*r.shape[:-1], sae.d_sae)
    for _ in range(k):
        score, idx = (r @ atoms.T).relu().max(dim=-1)
        score = score * (r.detach().norm(dim=-1) > stop_norm)
        codes = codes.scatter_add(-1, idx.unsqueeze(-1), score.unsqueeze(-1))
        r = r - score.unsqueeze(-1) * atoms[idx]
    err = x - (codes @ atoms + sae.b_dec)
    return codes, err.pow(2).sum() / (x - x.mean(0)).pow(2).sum()


def pursuit_problem(n_random: int, signed: bool, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Atoms [64, 16]: the 16 basis vectors and 48 random directions, and random tokens [n_random, 16].

    signed=False: the 48 directions are non-negative, and 40 more tokens have one large positive coordinate
    and small negative others: after that basis atom their residual is < 0 everywhere, so every score is <= 0
    and they stop (well-separated scores: no ties to flip). signed=True: the random tokens are spanned well
    and reach a residual threshold within k steps.
    """
    g = torch.Generator().manual_seed(seed)
    extra = torch.randn(48, 16, generator=g)
    W = torch.cat([torch.eye(16), extra if signed else extra.abs()]).double()
    x = torch.randn(n_random, 16, generator=g).double()
    if signed:
        return W / W.norm(dim=-1, keepdim=True), x
    hot = -0.1 - 0.1 * torch.rand(40, 16, generator=g).double()
    hot[torch.arange(40), torch.arange(40) % 16] = 3.0
    return W / W.norm(dim=-1, keepdim=True), torch.cat([x, hot])


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("n_random", [4, 400])  # 4 (+ 40) tokens score directly; 400 (+ 40) use the Gram path
@pytest.mark.parametrize(("k", "threshold"), [(3, 0.0), (12, 0.0), (12, 0.3), (40, 0.05)])
def test_fast_pursuit_matches_the_loop(signed, n_random, k, threshold):
    W, acts = pursuit_problem(n_random, signed)
    sae = build_dictionary(MPConfig(d_sae=64, k=k, residual_threshold=threshold, device="cpu"), d_in=16)
    sae = sae.double()
    with torch.no_grad():
        sae.W_dec.copy_(W * 1.1)  # not unit: atoms() renormalises in both
        # b_dec >= 0 keeps the hot tokens' small coordinates negative in r0 = x - b_dec.
        sae.b_dec.copy_(0.05 * torch.randn(16, generator=torch.Generator().manual_seed(1)).double().abs())
    ref_codes, ref_loss = reference_training_loss(sae, acts, k)
    ref_loss.backward()
    ref_grads = sae.W_dec.grad.clone(), sae.b_dec.grad.clone()
    sae.zero_grad()

    out = sae.training_loss(acts, torch.zeros(64, dtype=torch.bool))
    out.loss.backward()
    torch.testing.assert_close(out.codes, ref_codes.detach())
    torch.testing.assert_close(out.loss.detach(), ref_loss.detach())
    torch.testing.assert_close(sae.W_dec.grad, ref_grads[0])
    torch.testing.assert_close(sae.b_dec.grad, ref_grads[1])
    with torch.no_grad():  # the no-autograd encode gives the same codes
        torch.testing.assert_close(sae.encode(acts), ref_codes.detach())
    # Gradients through the codes themselves (encode under autograd), not only through the reconstruction.
    weights = torch.randn(ref_codes.shape, generator=torch.Generator().manual_seed(2)).double()
    sae.zero_grad()
    (reference_training_loss(sae, acts, k)[0] * weights).sum().backward()
    ref_grads = sae.W_dec.grad.clone(), sae.b_dec.grad.clone()
    sae.zero_grad()
    (sae.encode(acts) * weights).sum().backward()
    torch.testing.assert_close(sae.W_dec.grad, ref_grads[0])
    torch.testing.assert_close(sae.b_dec.grad, ref_grads[1])
    # The data does exercise the early stops: tokens with fewer non-zero steps than k.
    active = (ref_codes != 0).sum(-1)
    if not signed:
        assert bool((active[-40:] == 1).all())  # one basis atom, then no positive score
    elif threshold > 0:
        assert bool((active < k).any())


def test_pursuit_ignores_bf16_autocast_and_trains_in_bf16():
    # Pursuit runs in float32 outside autocast: under bf16 autocast the loss and codes are the float32 ones;
    # with bfloat16 weights the step still runs (no bfloat16 triangular solve), with bfloat16 codes.
    acts = plant(300, d_in=16, n_features=48, k_true=4).acts
    sae = build_dictionary(MPConfig(d_sae=48, k=6), d_in=16)
    sae.init_from_data(acts)
    dead = torch.zeros(48, dtype=torch.bool)
    plain = sae.training_loss(acts, dead)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = sae.training_loss(acts, dead)
    torch.testing.assert_close(mixed.loss, plain.loss)
    torch.testing.assert_close(mixed.codes, plain.codes)
    sae = sae.to(torch.bfloat16)
    out = sae.training_loss(acts, dead)
    out.loss.backward()
    assert out.codes.dtype == torch.bfloat16 and bool(sae.W_dec.grad.isfinite().all())
    assert abs(out.fvu.item() - plain.fvu.item()) < 0.05
