"""Hookpoints on the tiny Llama: capture equals hidden_states, early stop skips later layers, no leaks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

from featureatlas.tasks.common.hooks import (
    capture_activations,
    resolve_hookpoint,
    rewrap_output,
    splice,
    unwrap_output,
)
from tests.helpers import build_tiny_llama


@pytest.fixture
def model():
    return build_tiny_llama(seed=0)


@pytest.fixture
def input_ids():
    return torch.randint(1, 320, (2, 7), generator=torch.Generator().manual_seed(1))


def _hook_count(model: nn.Module) -> int:
    """Forward hooks on all modules (transformers may add its own, e.g. for output_hidden_states)."""
    return sum(len(m._forward_hooks) for m in model.modules())


def test_capture_equals_hidden_states(model, input_ids):
    mask = torch.ones_like(input_ids)
    mask[1, 5:] = 0  # a right-padded second context: the mask must reach the model the same way
    names = ["model.layers.0", "model.layers.1", "model.norm"]
    acts = capture_activations(model, names, input_ids, mask)
    with torch.no_grad():
        hidden = model(input_ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert list(acts) == names
    assert acts["model.layers.0"].shape == (2, 7, 32)
    torch.testing.assert_close(acts["model.layers.0"], hidden[1], rtol=0, atol=0)
    torch.testing.assert_close(acts["model.layers.1"], hidden[2], rtol=0, atol=0)
    # hidden_states[-1] is taken after the final norm, not straight after the last block.
    torch.testing.assert_close(acts["model.norm"], hidden[3], rtol=0, atol=0)
    assert not acts["model.layers.0"].requires_grad


def test_stop_early_skips_later_layers(model, input_ids):
    calls = {"model.layers.2": 0, "lm_head": 0}
    handles = [
        resolve_hookpoint(model, name).register_forward_hook(
            lambda *_, name=name: calls.__setitem__(name, calls[name] + 1)
        )
        for name in calls
    ]
    try:
        capture_activations(model, ["model.layers.1", "model.layers.0"], input_ids)
        assert calls == {"model.layers.2": 0, "lm_head": 0}
        # The counters do count: without the early stop both modules run once.
        capture_activations(model, ["model.layers.1", "model.layers.0"], input_ids, stop_early=False)
        assert calls == {"model.layers.2": 1, "lm_head": 1}
    finally:
        for h in handles:
            h.remove()


def test_hooks_removed_also_on_error(model, input_ids):
    before = _hook_count(model)
    capture_activations(model, ["model.layers.0", "model.layers.2"], input_ids)
    assert _hook_count(model) == before

    def boom(*_):
        raise RuntimeError("boom")

    # Fails mid-pass, after model.layers.0 has fired and before model.layers.2 has.
    handle = model.model.layers[1].register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            capture_activations(model, ["model.layers.0", "model.layers.2"], input_ids)
        with pytest.raises(RuntimeError, match="boom"), splice(model, "model.layers.0", lambda x: x):
            model(input_ids)
    finally:
        handle.remove()
    assert _hook_count(model) == before


def test_bad_name_lists_close_matches(model, input_ids):
    before = _hook_count(model)
    with pytest.raises(ValueError, match="close matches") as err:
        resolve_hookpoint(model, "model.layer.1")
    assert "'model.layers.1'" in str(err.value)
    assert "model.layers.N" in str(err.value)
    with pytest.raises(ValueError, match="model.layerz.0"):
        capture_activations(model, ["model.layerz.0"], input_ids)
    assert _hook_count(model) == before


def test_splice_identity_and_zeros(model, input_ids):
    before = _hook_count(model)
    with torch.no_grad():
        clean = model(input_ids).logits
        with splice(model, "model.layers.1", lambda x: x):
            same = model(input_ids).logits
        with splice(model, "model.layers.1", torch.zeros_like):
            zeroed = model(input_ids).logits
        # self_attn returns (output, weights): the tuple is kept and its first element replaced.
        with splice(model, "model.layers.0.self_attn", torch.zeros_like):
            attn_zeroed = model(input_ids).logits
        after = model(input_ids).logits
    torch.testing.assert_close(same, clean, rtol=0, atol=0)
    assert (zeroed - clean).abs().max() > 1e-3
    assert (attn_zeroed - clean).abs().max() > 1e-3
    torch.testing.assert_close(after, clean, rtol=0, atol=0)
    assert _hook_count(model) == before


def test_unwrap_and_rewrap_keep_structure():
    a, b, new = torch.ones(2), torch.zeros(3), torch.full((2,), 5.0)
    assert unwrap_output(a) is a
    assert unwrap_output((a, b)) is a
    out = rewrap_output((a, b), new)
    assert isinstance(out, tuple) and out[0] is new and out[1] is b
    model_output = BaseModelOutput(last_hidden_state=a, hidden_states=(b,))
    assert unwrap_output(model_output) is a
    replaced = rewrap_output(model_output, new)
    assert replaced.last_hidden_state is new and replaced.hidden_states == (b,)
    assert model_output.last_hidden_state is a  # the original is left alone
    with pytest.raises(TypeError, match="hidden state"):
        unwrap_output(("not a tensor",))


class _CallsTwice(nn.Module):
    """A toy LM that runs the same Linear twice, so its output per pass is ambiguous."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.lin = nn.Linear(4, 4)

    def forward(self, input_ids, attention_mask=None, use_cache=False):  # noqa: ARG002
        return SimpleNamespace(logits=self.lin(self.lin(self.embed(input_ids))))


def test_module_running_twice_is_refused():
    toy, ids = _CallsTwice(), torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="ran twice"):
        capture_activations(toy, ["lin"], ids, stop_early=False)
    assert _hook_count(toy) == 0
    # With the early stop the pass ends at the first call, whose output is the one returned.
    torch.testing.assert_close(capture_activations(toy, ["lin"], ids)["lin"], toy.lin(toy.embed(ids)))
