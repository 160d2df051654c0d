"""SAELens interop: TopK round trip with input scaling folded in, GBA exported as a standard SAE whose SAELens
forward pass matches, v5 and apply_b_dec_to_input=False files, and clear refusals."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from schemas.methods import GBAConfig, MPConfig, TopKConfig
from tasks.dictionary import build_dictionary
from tasks.dictionary.saelens import export_saelens, import_saelens
from tasks.dictionary.topk import TopKSAE


def trained_like_topk() -> TopKSAE:
    """A TopK SAE with random (non-trivial) weights, biases and input scale."""
    sae = build_dictionary(TopKConfig(d_sae=12, k=3, hookpoint="model.layers.1"), d_in=6)
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
        sae.W_enc.normal_()
        sae.input_scale.fill_(2.5)
    return sae


def saelens_forward(folder, acts: torch.Tensor) -> torch.Tensor:
    """What SAELens computes for a standard (ReLU) SAE with apply_b_dec_to_input."""
    w = load_file(str(folder / "sae_weights.safetensors"))
    codes = ((acts - w["b_dec"]) @ w["W_enc"] + w["b_enc"]).relu()
    return codes @ w["W_dec"] + w["b_dec"]


def test_topk_round_trip_folds_the_input_scale(tmp_path):
    sae = trained_like_topk()
    export_saelens(sae, tmp_path / "sl", model_name="tiny")
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 3 and (cfg["d_in"], cfg["d_sae"]) == (6, 12)
    assert cfg["normalize_activations"] == "none" and cfg["apply_b_dec_to_input"] is True
    assert cfg["metadata"]["hook_name"] == "model.layers.1" and cfg["metadata"]["model_name"] == "tiny"
    assert set(load_file(str(tmp_path / "sl" / "sae_weights.safetensors"))) == {
        "W_enc",
        "b_enc",
        "W_dec",
        "b_dec",
    }

    back = import_saelens(tmp_path / "sl")
    assert isinstance(back, TopKSAE) and back.k == 3 and back.input_scale.item() == 1.0
    acts = torch.randn(20, 6)
    with torch.no_grad():
        torch.testing.assert_close(back.encode(acts), sae.encode(acts))
        torch.testing.assert_close(back(acts).acts_hat, sae(acts).acts_hat)


def test_v5_topk_without_b_dec_on_input_is_read(tmp_path):
    sae = trained_like_topk()
    export_saelens(sae, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    w = load_file(str(tmp_path / "sae_weights.safetensors"))
    # The same SAE written v5-style, with b_dec no longer subtracted on input: b_enc absorbs -b_dec W_enc.
    del cfg["k"], cfg["architecture"]
    cfg |= {"architecture": "standard", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 3}}
    cfg["apply_b_dec_to_input"] = False
    w["b_enc"] = w["b_enc"] - w["b_dec"] @ w["W_enc"]
    from safetensors.torch import save_file

    save_file(w, str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    back = import_saelens(tmp_path)
    acts = torch.randn(20, 6)
    with torch.no_grad():
        torch.testing.assert_close(back(acts).acts_hat, sae(acts).acts_hat)


def test_gba_exports_as_a_standard_sae(tmp_path):
    gba = build_dictionary(GBAConfig(d_sae=10, n_groups=2), d_in=4)
    with torch.no_grad():
        gba.a.uniform_(0.5, 2.0)
        gba.b.uniform_(-0.3, 0.0)
        gba.b_pre.normal_()
        gba.input_scale.fill_(0.7)
    export_saelens(gba, tmp_path)
    assert json.loads((tmp_path / "cfg.json").read_text())["architecture"] == "standard"
    acts = torch.randn(30, 4)
    with torch.no_grad():
        torch.testing.assert_close(saelens_forward(tmp_path, acts), gba(acts).acts_hat)


def test_refusals_name_the_reason(tmp_path):
    with pytest.raises(ValueError, match="no SAELens equivalent"):
        export_saelens(build_dictionary(MPConfig(d_sae=8, k=2), d_in=4), tmp_path / "mp")
    export_saelens(trained_like_topk(), tmp_path / "g")
    cfg = json.loads((tmp_path / "g" / "cfg.json").read_text()) | {"architecture": "gated"}
    (tmp_path / "g" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="'gated' is not supported"):
        import_saelens(tmp_path / "g")
    with pytest.raises(ValueError, match="not a SAELens SAE folder"):
        import_saelens(tmp_path / "missing")
