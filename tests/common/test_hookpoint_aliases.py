"""Hookpoint aliases on tiny Llama, GPT-2, BERT and Gemma: each resolves to the right module and captures the
right tensor, checked against `output_hidden_states` and the block's own algebra.

Pre-LN blocks (Llama, Gemma, GPT-2) compute   h[L+1] = h[L] + attn_out + mlp_out,
post-LN BERT computes                          a = LN_a(h[L] + attn_out),  h[L+1] = LN_o(a + mlp_out),
and in every one attn_out = o_proj(attn_z) and mlp_out = down_proj(mlp_hidden), so each alias is pinned by
equalities against hidden states the model reports itself.
"""

from __future__ import annotations

import pytest
import torch

from featureatlas.tasks.common.hookpoints import resolve_site
from featureatlas.tasks.common.hooks import capture_activations, resolve_hookpoint, splice
from tests.helpers import build_tiny_bert, build_tiny_gemma, build_tiny_gpt2, build_tiny_llama

ALL = ["resid_post.{L}", "mlp_out.{L}", "mlp_hidden.{L}", "attn_out.{L}", "attn_z.{L}"]


@pytest.fixture
def input_ids():
    return torch.randint(2, 320, (2, 6), generator=torch.Generator().manual_seed(1))


def _capture(model, layer, input_ids):
    names = [a.format(L=layer) for a in ALL]
    acts = capture_activations(model, names, input_ids, torch.ones_like(input_ids))
    return dict(zip(["resid", "mlp_out", "mlp_hidden", "attn_out", "attn_z"], acts.values()))


@pytest.mark.parametrize("builder", [build_tiny_llama, build_tiny_gemma, build_tiny_gpt2])
def test_pre_ln_aliases_add_up_to_the_residual_stream(builder, input_ids):
    model = builder()
    with torch.no_grad():
        hs = model(input_ids, output_hidden_states=True).hidden_states
    a = _capture(model, 0, input_ids)
    torch.testing.assert_close(a["resid"], hs[1], rtol=0, atol=0)
    torch.testing.assert_close(hs[0] + a["attn_out"] + a["mlp_out"], hs[1], rtol=1e-5, atol=1e-5)
    site = resolve_site(model, "attn_z.0")
    out_proj, down_proj = site.module, resolve_site(model, "mlp_hidden.0").module
    with torch.no_grad():
        torch.testing.assert_close(out_proj(a["attn_z"]), a["attn_out"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(down_proj(a["mlp_hidden"]), a["mlp_out"], rtol=1e-5, atol=1e-6)
    # attn_z is [.., heads * d_head] with the layout recorded on the site; mlp_hidden is the MLP's width
    assert a["attn_z"].shape[-1] == site.n_heads * site.d_head and site.n_heads == 4
    assert site.read == "input" and site.layout()["d_head"] == site.d_head
    assert a["mlp_hidden"].shape[-1] == (128 if builder is build_tiny_gpt2 else 64)  # GPT-2: 4 * n_embd


def test_llama_alias_modules_and_last_layer(input_ids):
    model = build_tiny_llama()
    expected = {
        "resid_post.2": ("model.layers.2", "output"),
        "mlp_out.2": ("model.layers.2.mlp", "output"),
        "mlp_hidden.2": ("model.layers.2.mlp.down_proj", "input"),
        "attn_out.2": ("model.layers.2.self_attn", "output"),
        "attn_z.2": ("model.layers.2.self_attn.o_proj", "input"),
    }
    assert {n: (s.module_name, s.read) for n in expected for s in [resolve_site(model, n)]} == expected
    # module names and aliases name the same tensor
    acts = capture_activations(model, ["resid_post.2", "model.layers.2"], input_ids)
    torch.testing.assert_close(acts["resid_post.2"], acts["model.layers.2"], rtol=0, atol=0)


def test_gpt2_alias_modules():
    model = build_tiny_gpt2()
    assert resolve_site(model, "mlp_hidden.1").module_name == "transformer.h.1.mlp.c_proj"
    assert resolve_site(model, "attn_z.1").module_name == "transformer.h.1.attn.c_proj"
    assert resolve_site(model, "attn_out.1").module_name == "transformer.h.1.attn"


def test_bert_aliases(input_ids):
    model = build_tiny_bert()
    with torch.no_grad():
        hs = model(input_ids, output_hidden_states=True).hidden_states
    a = _capture(model, 1, input_ids)
    layer = model.encoder.layer[1]
    torch.testing.assert_close(a["resid"], hs[2], rtol=0, atol=0)
    with torch.no_grad():
        after_attn = layer.attention.output.LayerNorm(hs[1] + a["attn_out"])
        torch.testing.assert_close(layer.output.LayerNorm(after_attn + a["mlp_out"]), hs[2])
        torch.testing.assert_close(layer.attention.output.dense(a["attn_z"]), a["attn_out"])
        torch.testing.assert_close(layer.output.dense(a["mlp_hidden"]), a["mlp_out"])
        torch.testing.assert_close(layer.intermediate(after_attn), a["mlp_hidden"])
    assert resolve_site(model, "mlp_hidden.1").module_name == "encoder.layer.1.output.dense"


def test_splice_at_an_input_site_replaces_the_input(input_ids):
    model = build_tiny_llama()
    with torch.no_grad():
        clean = model(input_ids).logits
        with splice(model, "mlp_hidden.1", lambda x: x):
            same = model(input_ids).logits
        with splice(model, "mlp_hidden.1", torch.zeros_like):
            zero_hidden = model(input_ids).logits
        # zeroing the down-projection's input is zeroing the MLP's output (down_proj has no bias)
        with splice(model, "mlp_out.1", torch.zeros_like):
            zero_out = model(input_ids).logits
    torch.testing.assert_close(same, clean, rtol=0, atol=0)
    torch.testing.assert_close(zero_hidden, zero_out, rtol=0, atol=0)
    assert (zero_hidden - clean).abs().max() > 1e-4
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == 0


def test_alias_errors_say_why():
    model = build_tiny_llama()
    with pytest.raises(ValueError, match=r"has 3 blocks.*below 3"):
        resolve_hookpoint(model, "mlp_out.7")
    with pytest.raises(ValueError, match=r"not found.*aliases"):
        resolve_hookpoint(model, "mlp_outt.1")
    model.model.layers[0].mlp.down_proj = None  # a block without a down-projection
    with pytest.raises(ValueError, match=r"'mlp_hidden.0' cannot resolve.*model.layers.0.mlp.down_proj"):
        resolve_hookpoint(model, "mlp_hidden.0")
    toy = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no list of blocks"):
        resolve_hookpoint(toy, "resid_post.0")
