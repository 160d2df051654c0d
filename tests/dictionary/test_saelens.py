"""SAELens interop: every exportable method round-trips through the v6 and v5 layouts with identical
encode/decode, the exported files compute the same function under SAELens' own forward pass (written out
below from its `saes/*.py`), foreign files (no b_dec on input, unnormalised decoders, finetuning scale) are
read exactly, and methods or files we cannot reproduce are refused with the reason."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from featureatlas.schemas.methods import (
    BatchTopKConfig,
    GatedConfig,
    GBAConfig,
    JumpReLUConfig,
    MatryoshkaConfig,
    MPConfig,
    ReLUConfig,
    SemiNMFConfig,
    ThresholdConfig,
    TopKConfig,
)
from featureatlas.tasks.dictionary import build_dictionary
from featureatlas.tasks.dictionary.saelens import EXPORTERS, export_saelens, import_saelens

D_IN, D_SAE = 6, 12


def acts(n: int = 40) -> torch.Tensor:
    return 2.0 * torch.randn(n, D_IN, generator=torch.Generator().manual_seed(n))


def randomised(cfg, **buffers):
    """A dictionary with random (non-trivial) weights, biases and input scale, in eval mode."""
    d = build_dictionary(cfg, d_in=D_IN)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in d.named_parameters():
            if name == "W" or (name == "W_dec" and getattr(d, "unit_norm_decoder", True)):
                p.copy_(torch.nn.functional.normalize(torch.randn(p.shape, generator=g), dim=-1))
            elif name == "threshold":
                p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.05)
            elif name == "a":  # GBA's output scales: positive, or the decoder row points the other way
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif name in ("W_enc", "W", "W_dec"):
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
        for name, value in buffers.items():
            getattr(d, name).copy_(torch.as_tensor(value))
        d.input_scale.fill_(0.7)
    return d.eval()


def saelens_forward(folder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, x_hat) as SAELens computes them from the folder, for both cfg layouts."""
    cfg = json.loads((folder / "cfg.json").read_text())
    w = load_file(str(folder / "sae_weights.safetensors"))
    sae_in = x - w["b_dec"] if cfg.get("apply_b_dec_to_input", True) else x
    arch = cfg["architecture"]
    if arch == "gated":
        gate = (sae_in @ w["W_enc"] + w["b_gate"] > 0).float()
        codes = gate * (sae_in @ (w["W_enc"] * w["r_mag"].exp()) + w["b_mag"]).relu()
    else:
        pre = sae_in @ w["W_enc"] + w["b_enc"]
        if arch == "jumprelu":
            codes = pre.relu() * (pre > w["threshold"]).float()
        elif arch == "topk" or cfg.get("activation_fn_str") == "topk":
            k = cfg.get("k") or cfg["activation_fn_kwargs"]["k"]
            top = pre.topk(k, dim=-1)
            codes = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
        else:
            codes = pre.relu()
    return codes, codes @ w["W_dec"] + w["b_dec"]


CASES = {
    "relu": (ReLUConfig(d_sae=D_SAE), {}),
    "relu_scaled_l1": (ReLUConfig(d_sae=D_SAE, scaled_l1=True), {}),
    "topk": (TopKConfig(d_sae=D_SAE, k=3), {}),
    "batchtopk": (BatchTopKConfig(d_sae=D_SAE, k=3), {"threshold": 0.4}),
    "matryoshka": (MatryoshkaConfig(d_sae=D_SAE, k=3), {"threshold": 0.4}),
    "jumprelu": (JumpReLUConfig(d_sae=D_SAE), {}),
    "gated": (GatedConfig(d_sae=D_SAE), {}),
    "threshold": (ThresholdConfig(d_sae=D_SAE, tau=0.3, use_bias=True), {}),
    "gba": (GBAConfig(d_sae=D_SAE, n_groups=2), {"b": -0.2 * torch.rand(D_SAE), "b_pre": torch.randn(D_IN)}),
}
ARCHITECTURE = {
    "relu": "standard",
    "relu_scaled_l1": "standard",
    "topk": "topk",
    "gated": "gated",
    "gba": "standard",
}


@pytest.mark.parametrize("version", ["v6", "v5"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_and_saelens_forward_match(tmp_path, case, version):
    cfg, buffers = CASES[case]
    ours = randomised(cfg.model_copy(update={"hookpoint": "model.layers.2"}), **buffers)
    folder = export_saelens(ours, tmp_path / "sl", model_name="tiny", version=version)
    raw = json.loads((folder / "cfg.json").read_text())
    arch = ARCHITECTURE.get(case, "jumprelu")
    x = acts()
    with torch.no_grad():
        codes, x_hat = ours.encode(x), ours(x).acts_hat
        assert (codes > 0).any() and (codes == 0).any()  # the activation really selects
        sl_codes, sl_hat = saelens_forward(folder, x)
        torch.testing.assert_close(sl_codes, codes)
        torch.testing.assert_close(sl_hat, x_hat)
        back = import_saelens(folder)
        torch.testing.assert_close(back.encode(x), codes)
        torch.testing.assert_close(back(x).acts_hat, x_hat)
        torch.testing.assert_close(back.decoder_directions(), ours.decoder_directions(), atol=1e-5, rtol=0)
    # The folded input scale comes back out of the weights (except where the decoder is free).
    scale = 1.0 if case in ("relu_scaled_l1", "gba") else 0.7
    assert back.input_scale.item() == pytest.approx(scale) and back.cfg.hookpoint == "model.layers.2"
    assert type(back).method == {"standard": "relu"}.get(arch, arch)
    assert raw["normalize_activations"] == "none" and raw["apply_b_dec_to_input"] is True
    if version == "v6":
        assert raw["architecture"] == arch and raw["metadata"]["sae_lens_version"].startswith("6.")
        assert raw["metadata"]["hook_name"] == "model.layers.2" and raw["metadata"]["model_name"] == "tiny"
        assert raw.get("k") == (3 if case == "topk" else None)
    else:
        assert "metadata" not in raw and raw["hook_name"] == "model.layers.2" and raw["hook_layer"] == 2
        assert raw["architecture"] == ("standard" if arch == "topk" else arch)
        assert raw["activation_fn_str"] == ("topk" if case == "topk" else "relu")
    per_arch = {"gated": {"b_gate", "r_mag", "b_mag"}, "jumprelu": {"b_enc", "threshold"}}
    expected_keys = {"W_enc", "W_dec", "b_dec"} | per_arch.get(arch, {"b_enc"})
    assert set(load_file(str(folder / "sae_weights.safetensors"))) == expected_keys


def test_threshold_tie_fires_as_ours_does(tmp_path):
    # Ours fires on pre >= tau; the exported jumprelu threshold sits one float below tau, so a pre-activation
    # of exactly tau still fires. W_enc = I (d_in 2), no biases, scale 1: pre = x.
    sae = build_dictionary(ThresholdConfig(d_sae=2, tau=0.5), d_in=2)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2))
        sae.W_dec.copy_(torch.eye(2))
    export_saelens(sae, tmp_path)
    x = torch.tensor([[0.5, 0.4999]])
    expected = torch.tensor([[0.5, 0.0]])
    torch.testing.assert_close(sae.encode(x), expected)
    torch.testing.assert_close(saelens_forward(tmp_path, x)[0], expected)


def write(folder, cfg: dict, tensors: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(cfg))


def foreign(arch: str, g: torch.Generator) -> dict:
    """Weights as a SAELens-trained SAE might hold them: decoder rows of norm 0.1-3, not unit."""
    t = {"W_enc": torch.randn(D_IN, D_SAE, generator=g), "b_dec": torch.randn(D_IN, generator=g)}
    t["W_dec"] = torch.randn(D_SAE, D_IN, generator=g) * (torch.rand(D_SAE, 1, generator=g) * 2.9 + 0.1)
    if arch == "gated":
        t |= {name: 0.3 * torch.randn(D_SAE, generator=g) for name in ("b_gate", "r_mag", "b_mag")}
    else:
        t["b_enc"] = 0.3 * torch.randn(D_SAE, generator=g)
    if arch == "jumprelu":
        t["threshold"] = torch.rand(D_SAE, generator=g) - 0.2  # some negative: SAELens' relu still applies
    return t


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "gated", "topk"])
def test_foreign_files_without_b_dec_on_input_and_free_decoder_norms(tmp_path, arch):
    t = foreign(arch, torch.Generator().manual_seed(11))
    cfg = {
        "architecture": arch,
        "d_in": D_IN,
        "d_sae": D_SAE,
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "metadata": {"sae_lens_version": "6.5.1", "hook_name": "h"},
    }
    if arch == "topk":
        cfg["k"] = 4
    write(tmp_path, cfg, t)
    x = acts(50)
    sl_codes, sl_hat = saelens_forward(tmp_path, x)
    back = import_saelens(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(back(x).acts_hat, sl_hat, atol=1e-4, rtol=1e-4)
        codes = back.encode(x)
    assert torch.equal(codes > 0, sl_codes > 0)  # the same latents fire
    norms = t["W_dec"].norm(dim=-1)
    if arch in ("jumprelu", "gated"):
        # Decoder norms are folded into the codes (SAELens' fold_W_dec_norm): codes grow by each row's norm.
        torch.testing.assert_close(codes, sl_codes * norms, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(back.W_dec.norm(dim=-1), torch.ones(D_SAE))
    else:
        torch.testing.assert_close(codes, sl_codes, atol=1e-4, rtol=1e-4)
    if arch != "topk":  # our TopK SAE assumes unit rows: its decoder_directions are the raw rows
        torch.testing.assert_close(back.decoder_directions().norm(dim=-1), torch.ones(D_SAE))
    if arch == "standard":
        assert back.cfg.scaled_l1  # an unconstrained decoder, kept as it is


def test_v5_topk_with_finetuning_scale_is_read(tmp_path):
    g = torch.Generator().manual_seed(5)
    t = foreign("standard", g)
    t["W_dec"] = torch.nn.functional.normalize(t["W_dec"], dim=-1)
    scale = torch.rand(D_SAE, generator=g) + 0.5
    write(
        tmp_path,
        {
            "architecture": "standard",
            "activation_fn_str": "topk",
            "activation_fn_kwargs": {"k": 3},
            "d_in": D_IN,
            "d_sae": D_SAE,
            "hook_name": "blocks.1.hook_resid_pre",
            "finetuning_scaling_factor": True,
            "normalize_activations": False,
        },
        t | {"scaling_factor": scale},
    )
    back = import_saelens(tmp_path)
    x = acts(30)
    sl_codes, _ = saelens_forward(tmp_path, x)
    with torch.no_grad():
        torch.testing.assert_close(back.encode(x), sl_codes)
        torch.testing.assert_close(back.decode(sl_codes), (scale * sl_codes) @ t["W_dec"] + t["b_dec"])
    assert back.k == 3 and back.cfg.hookpoint == "blocks.1.hook_resid_pre"


def test_refusals_name_the_reason(tmp_path):
    for cfg in (MPConfig(d_sae=8, k=2), SemiNMFConfig(d_sae=8)):
        with pytest.raises(ValueError, match="no SAELens architecture") as err:
            export_saelens(build_dictionary(cfg, d_in=4), tmp_path / cfg.method)
        assert all(name in str(err.value) for name in EXPORTERS)  # it lists what can be exported
        assert not (tmp_path / cfg.method).exists()
    transcoder = TopKConfig(d_sae=8, k=2, hookpoint="a", target_hookpoint="b")
    with pytest.raises(ValueError, match="is a transcoder"):
        export_saelens(build_dictionary(transcoder, d_in=4), tmp_path / "transcoder")
    assert not (tmp_path / "transcoder").exists()
    with pytest.raises(ValueError, match="v5 SAELens format needs a hook name"):
        export_saelens(build_dictionary(ReLUConfig(d_sae=8), d_in=4), tmp_path / "v5", version="v5")
    good = {"d_in": D_IN, "d_sae": D_SAE, "metadata": {"sae_lens_version": "6.0.0"}}
    t = foreign("standard", torch.Generator().manual_seed(1))
    for bad, match in (
        ({"architecture": "transcoder"}, "'transcoder' is not supported"),
        ({"architecture": "standard", "normalize_activations": "layer_norm"}, "layer_norm"),
        ({"architecture": "topk"}, "needs 'k'"),
        ({"architecture": "jumprelu"}, r"lacks tensors \['threshold'\]"),
    ):
        write(tmp_path / "bad", good | bad, t)
        with pytest.raises(ValueError, match=match):
            import_saelens(tmp_path / "bad")
    write(tmp_path / "v5", {"d_in": D_IN, "d_sae": D_SAE, "activation_fn_str": "tanh-relu"}, t)
    with pytest.raises(ValueError, match="'tanh-relu' is not supported"):
        import_saelens(tmp_path / "v5")
    with pytest.raises(ValueError, match="not a SAELens SAE folder"):
        import_saelens(tmp_path / "missing")


def saelens_rescaled_topk(folder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAELens' TopKSAE with rescale_acts_by_decoder_norm: top-k of pre * ||W_dec_i||, codes / ||W_dec_i||
    before W_dec (`TopKSAE.encode`, `act_times_W_dec`)."""
    cfg = json.loads((folder / "cfg.json").read_text())
    w = load_file(str(folder / "sae_weights.safetensors"))
    norms = w["W_dec"].norm(dim=-1)
    pre = ((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]) * norms
    top = pre.topk(cfg["k"], dim=-1)
    codes = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    return codes, (codes / norms) @ w["W_dec"] + w["b_dec"]


def test_topk_rescaled_by_decoder_norm_is_folded_exactly(tmp_path):
    t = foreign("topk", torch.Generator().manual_seed(21))  # decoder rows of norm 0.1-3
    cfg = {
        "architecture": "topk",
        "d_in": D_IN,
        "d_sae": D_SAE,
        "k": 4,
        "rescale_acts_by_decoder_norm": True,
        "normalize_activations": "none",
        "metadata": {"sae_lens_version": "6.12.0", "hook_name": "h"},
    }
    write(tmp_path, cfg, t)
    x = acts(64)
    sl_codes, sl_hat = saelens_rescaled_topk(tmp_path, x)
    # Ignoring the flag picks other latents and reconstructs differently: the test can tell.
    plain_codes, plain_hat = saelens_forward(tmp_path, x)
    assert not torch.equal(plain_codes > 0, sl_codes > 0)
    back = import_saelens(tmp_path)
    with torch.no_grad():
        codes, hat = back.encode(x), back(x).acts_hat
    torch.testing.assert_close(codes, sl_codes, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(hat, sl_hat, atol=1e-4, rtol=1e-4)
    # The folded decoder is unit-norm, so the dictionary's directions are SAELens' rows, normalised.
    torch.testing.assert_close(back.W_dec.norm(dim=-1), torch.ones(D_SAE))
    torch.testing.assert_close(back.decoder_directions(), torch.nn.functional.normalize(t["W_dec"], dim=-1))


def test_rescale_flag_on_other_architectures_is_refused(tmp_path):
    cfg = {"architecture": "jumprelu", "d_in": D_IN, "d_sae": D_SAE, "rescale_acts_by_decoder_norm": True}
    write(tmp_path, cfg | {"metadata": {"sae_lens_version": "6.0.0"}}, foreign("jumprelu", torch.Generator()))
    with pytest.raises(ValueError, match="rescale_acts_by_decoder_norm is set on a 'jumprelu' SAE"):
        import_saelens(tmp_path)
