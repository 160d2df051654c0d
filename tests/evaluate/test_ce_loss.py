"""CE-loss score on the tiny Llama: exact and zero dictionaries pin both ends of the scale."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from featureatlas.tasks.common.hooks import capture_activations, splice
from featureatlas.tasks.evaluate.ce_loss import ce_loss_score
from tests.helpers import IdentityDictionary as Identity
from tests.helpers import build_tiny_llama

HOOKPOINT = "model.layers.1"


class Zeros(Identity):
    """A dictionary that reconstructs nothing."""

    def encode(self, acts: Tensor) -> Tensor:
        return torch.zeros(*acts.shape[:-1], self.d_sae)


class Halves(Identity):
    """A lossy dictionary: acts_hat = x / 2."""

    def decode(self, codes: Tensor) -> Tensor:
        return super().decode(codes) / 2


class GarblesTheSink(Identity):
    """Exact, except on the given position-0 activations, which it maps far away."""

    def __init__(self, d: int, sinks: Tensor):
        super().__init__(d)
        self.sinks = sinks  # [n_ctx, d]

    def encode(self, acts: Tensor) -> Tensor:
        is_sink = (acts[..., None, :] - self.sinks).abs().amax(-1).amin(-1) < 1e-6
        return super().encode(acts + 10.0 * is_sink[..., None])


@pytest.fixture(scope="module")
def model():
    # Larger initial weights than the default 0.02, so that activations at the hookpoint move the loss
    # clearly. Random weights predict worse than uniform: here L_clean > L_zero (= log 320, as zeroed
    # residuals give all-zero logits), which the score's formula handles like the usual L_clean < L_zero.
    return build_tiny_llama(seed=0, initializer_range=0.3)


@pytest.fixture(scope="module")
def input_ids():
    return torch.randint(1, 320, (5, 12), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def right_padded():
    # Lengths 12, 9, 4, 12, 2: real tokens first, padding (mask 0) after.
    mask = torch.zeros(5, 12, dtype=torch.long)
    for row, length in enumerate([12, 9, 4, 12, 2]):
        mask[row, :length] = 1
    return mask


def _manual_loss(model, ids, mask, fn=None) -> float:
    """Token-weighted mean next-token CE, one context at a time, only over real (t, t+1) pairs."""
    total, count = 0.0, 0
    for row in range(ids.shape[0]):
        length = int(mask[row].sum())  # right padding: the first `length` tokens are real
        with torch.no_grad():
            if fn is None:
                logits = model(ids[row : row + 1, :length]).logits[0]
            else:
                with splice(model, HOOKPOINT, fn):
                    logits = model(ids[row : row + 1, :length]).logits[0]
        total += F.cross_entropy(logits[:-1].double(), ids[row, 1:length], reduction="sum").item()
        count += length - 1
    return total / count


def test_identity_gives_clean_loss_and_score_one(model, input_ids):
    result = ce_loss_score(model, Identity(32), HOOKPOINT, input_ids, batch_size=2)
    assert result.n_tokens == 5 * 11
    assert result.ce_loss_spliced == pytest.approx(result.ce_loss_clean, abs=1e-9)
    assert result.ce_loss_score == pytest.approx(1.0, abs=1e-6)
    assert abs(result.ce_loss_zero - result.ce_loss_clean) > 0.1


def test_zero_dictionary_scores_zero(model, input_ids):
    result = ce_loss_score(model, Zeros(32), HOOKPOINT, input_ids, batch_size=8)
    assert result.ce_loss_spliced == pytest.approx(result.ce_loss_zero, abs=1e-9)
    assert result.ce_loss_score == pytest.approx(0.0, abs=1e-6)


def test_losses_match_a_per_context_computation(model, input_ids, right_padded):
    # Padded contexts in different batches: a mean of per-batch means would not match the token mean.
    results = [
        ce_loss_score(
            model, Halves(32), HOOKPOINT, input_ids, right_padded, batch_size=bs, exclude_first_token=False
        )
        for bs in (1, 3, 8)
    ]
    clean = _manual_loss(model, input_ids, right_padded)
    spliced = _manual_loss(model, input_ids, right_padded, lambda x: x / 2)
    zero = _manual_loss(model, input_ids, right_padded, torch.zeros_like)
    for r in results:
        assert r.n_tokens == 11 + 8 + 3 + 11 + 1
        assert r.ce_loss_clean == pytest.approx(clean, rel=1e-5)
        assert r.ce_loss_spliced == pytest.approx(spliced, rel=1e-5)
        assert r.ce_loss_zero == pytest.approx(zero, rel=1e-5)
        assert r.ce_loss_score == pytest.approx((zero - spliced) / (zero - clean), rel=1e-4)


def test_left_padding_keeps_the_first_real_token(model, input_ids):
    # Lengths 12, 7, 3, 12, 5 with the padding first: the first real token is the sink to keep clean, and
    # no real token is scored as predicted from a pad. RoPE is relative, so the shift changes nothing else.
    lengths = [12, 7, 3, 12, 5]
    padded, mask = input_ids.clone(), torch.zeros_like(input_ids)
    for row, length in enumerate(lengths):
        padded[row, : 12 - length] = 0
        mask[row, 12 - length :] = 1
    result = ce_loss_score(model, Halves(32), HOOKPOINT, padded, mask, batch_size=2)

    def halve_after_first(x: Tensor) -> Tensor:
        return torch.cat([x[:, :1], x[:, 1:] / 2], dim=1)

    # The same contexts without padding, one at a time: their real tokens are the last `length` ones.
    unpadded = torch.stack([padded[row].roll(length) for row, length in enumerate(lengths)])
    assert result.n_tokens == sum(lengths) - len(lengths)
    assert result.ce_loss_clean == pytest.approx(_manual_loss(model, unpadded, mask.flip(1)), rel=1e-5)
    expected = _manual_loss(model, unpadded, mask.flip(1), halve_after_first)
    assert result.ce_loss_spliced == pytest.approx(expected, rel=1e-5)


def test_first_token_keeps_its_clean_activation(model, input_ids):
    sinks = capture_activations(model, [HOOKPOINT], input_ids)[HOOKPOINT][:, 0]
    garbler = GarblesTheSink(32, sinks)

    kept = ce_loss_score(model, garbler, HOOKPOINT, input_ids, exclude_first_token=True)
    assert kept.ce_loss_spliced == pytest.approx(kept.ce_loss_clean, abs=1e-9)
    assert kept.ce_loss_score == pytest.approx(1.0, abs=1e-6)
    # The zero run also keeps position 0: it equals zeroing positions 1.. only.
    mask = torch.ones_like(input_ids)

    def zero_after_first(x: Tensor) -> Tensor:
        return torch.cat([x[:, :1], torch.zeros_like(x[:, 1:])], dim=1)

    assert kept.ce_loss_zero == pytest.approx(
        _manual_loss(model, input_ids, mask, zero_after_first), rel=1e-5
    )

    replaced = ce_loss_score(model, garbler, HOOKPOINT, input_ids, exclude_first_token=False)
    assert abs(replaced.ce_loss_spliced - replaced.ce_loss_clean) > 0.01
    assert abs(replaced.ce_loss_zero - kept.ce_loss_zero) > 0.01
    assert replaced.ce_loss_zero == pytest.approx(
        _manual_loss(model, input_ids, mask, torch.zeros_like), rel=1e-5
    )


def test_model_mode_is_restored(model, input_ids):
    model.train()
    try:
        ce_loss_score(model, Identity(32), HOOKPOINT, input_ids)
        assert model.training
    finally:
        model.eval()


def test_wrong_width_names_the_fix(model, input_ids):
    with pytest.raises(ValueError, match="d_in is 16"):
        ce_loss_score(model, Identity(16), HOOKPOINT, input_ids)


class _IgnoresProbe(nn.Module):
    """A toy LM that computes `probe` and throws it away: zeroing it cannot change the loss."""

    def __init__(self):
        super().__init__()
        self.embed, self.probe, self.head = nn.Embedding(320, 32), nn.Linear(32, 32), nn.Linear(32, 320)

    def forward(self, input_ids, attention_mask=None, use_cache=False):  # noqa: ARG002
        x = self.embed(input_ids)
        self.probe(x)
        return SimpleNamespace(logits=self.head(x))


def test_hookpoint_without_effect_is_refused(input_ids):
    with pytest.raises(ValueError, match="no effect on the loss"):
        ce_loss_score(_IgnoresProbe(), Identity(32), "probe", input_ids)


def test_adding_the_error_term_back_leaves_the_model_unchanged(model, input_ids):
    # x_hat + (x - x_hat) is x up to float rounding, for any dictionary: the spliced model is the model.
    lossy = Halves(32)

    def with_error(x: Tensor) -> Tensor:
        x_hat = lossy.decode(lossy.encode(x))
        return x_hat + (x - x_hat)

    with torch.no_grad():
        clean = model(input_ids).logits
        with splice(model, HOOKPOINT, with_error):
            spliced = model(input_ids).logits
    torch.testing.assert_close(spliced, clean, rtol=1e-5, atol=1e-5)


def test_mean_ablation_loss_increase_and_kl(model, input_ids):
    mask = torch.ones_like(input_ids)
    acts = capture_activations(model, [HOOKPOINT], input_ids)[HOOKPOINT]
    mean = acts[:, 1:].reshape(-1, 32).mean(0)
    exact = ce_loss_score(model, Identity(32), HOOKPOINT, input_ids, mean=mean, exclude_first_token=False)
    assert exact.kl_spliced == pytest.approx(0.0, abs=1e-9)
    assert exact.ce_loss_increase == pytest.approx(0.0, abs=1e-9)
    assert exact.ce_loss_score_mean == pytest.approx(1.0, abs=1e-6)
    expected_mean = _manual_loss(model, input_ids, mask, lambda x: mean.expand_as(x))
    assert exact.ce_loss_mean == pytest.approx(expected_mean, rel=1e-5)

    lossy = ce_loss_score(model, Halves(32), HOOKPOINT, input_ids, mean=mean, exclude_first_token=False)
    assert lossy.ce_loss_increase == pytest.approx(lossy.ce_loss_spliced - lossy.ce_loss_clean)
    assert lossy.ce_loss_score_mean == pytest.approx(
        (lossy.ce_loss_mean - lossy.ce_loss_spliced) / (lossy.ce_loss_mean - lossy.ce_loss_clean), rel=1e-9
    )
    # KL(clean || spliced) by hand over every (t, t+1) pair.
    with torch.no_grad():
        log_p = F.log_softmax(model(input_ids).logits[:, :-1].double(), -1)
        with splice(model, HOOKPOINT, lambda x: x / 2):
            log_q = F.log_softmax(model(input_ids).logits[:, :-1].double(), -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()
    assert kl > 1e-3
    assert lossy.kl_spliced == pytest.approx(kl, rel=1e-5)
    assert ce_loss_score(model, Halves(32), HOOKPOINT, input_ids).ce_loss_mean is None
