"""Features as causes on the tiny Llama: latent ablation and KL-targeted steering, hand-built dictionaries."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from featureatlas.tasks.common.hooks import splice
from featureatlas.tasks.evaluate.ablation import ablate_latents, latent_contribution, most_frequent_latents
from featureatlas.tasks.evaluate.ce_loss import ce_loss_score
from featureatlas.tasks.evaluate.steering import decoder_direction, steer_latent
from tests.helpers import IdentityDictionary as Identity
from tests.helpers import build_tiny_llama

HOOKPOINT = "model.layers.1"


@pytest.fixture(scope="module")
def model():
    return build_tiny_llama(seed=0, initializer_range=0.3)


@pytest.fixture(scope="module")
def input_ids():
    return torch.randint(1, 320, (4, 10), generator=torch.Generator().manual_seed(5))


def test_contribution_and_direction_of_a_planted_latent():
    x = torch.tensor([[2.0, -3.0, 0.5]])
    delta, fired = latent_contribution(Identity(3), x, 1)  # latent 1 = relu(x1) = 0: silent here
    assert delta.abs().sum() == 0 and not fired.item()
    delta, fired = latent_contribution(Identity(3), x, 4)  # latent 3 + 1 = relu(-x1) = 3, writes -e_1
    assert delta.tolist() == [[0.0, -3.0, 0.0]] and fired.item()
    assert decoder_direction(Identity(3), 4).tolist() == [0.0, -1.0, 0.0]


def test_ablating_a_latent_removes_exactly_its_share(model, input_ids):
    # Latent 0 of the identity is relu(x_0) writing +e_0: ablating it leaves min(x_0, 0) in coordinate 0
    # and every other coordinate as it was. Check against that splice made by hand.
    (result,) = ablate_latents(
        model, Identity(32), HOOKPOINT, input_ids, None, [0], exclude_first_token=False
    )
    ids = input_ids
    clean = ce_loss_score(model, Identity(32), HOOKPOINT, ids, exclude_first_token=False).ce_loss_clean

    def remove_latent_0(x: Tensor) -> Tensor:
        x = x.clone()
        x[..., 0] = torch.clamp(x[..., 0], max=0)
        return x

    with torch.no_grad(), splice(model, HOOKPOINT, remove_latent_0):
        logits = model(ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).double(), ids[:, 1:].flatten())
    assert result.loss_change == pytest.approx(loss.item() - clean, rel=1e-5, abs=1e-9)
    assert 0 < result.frequency < 1
    assert result.mean_abs_logit_change > 0


def test_ranking_and_frequent_latents(model, input_ids):
    mask = torch.ones_like(input_ids)
    top = most_frequent_latents(model, Identity(32), HOOKPOINT, input_ids, mask, 6)
    assert len(top) == 6 and len(set(top)) == 6
    results = ablate_latents(model, Identity(32), HOOKPOINT, input_ids, mask, top)
    changes = [abs(r.loss_change) for r in results]
    assert changes == sorted(changes, reverse=True)
    assert {r.latent for r in results} == set(top)
    with pytest.raises(ValueError, match="outside"):
        ablate_latents(model, Identity(32), HOOKPOINT, input_ids, mask, [64])


@pytest.mark.parametrize("sign", [1, -1])
def test_steering_search_hits_its_kl_target(model, sign):
    prompt = torch.tensor([[5, 17, 42, 99, 7]])
    result = steer_latent(
        model, Identity(32), HOOKPOINT, prompt, 3, sign=sign, target_kl=0.5, tolerance=0.02, n_new_tokens=4
    )
    assert result.reached
    assert result.kl == pytest.approx(0.5, rel=0.02)
    assert (result.alpha > 0) == (sign > 0)
    assert len(result.continuation) == 4 and len(result.top_promoted) == 5
    assert set(result.top_promoted).isdisjoint(result.top_suppressed)
