"""bf16 autocast and torch.compile: the options validate, leave old fingerprints alone, and train to the same
loss as float32 eager (bf16 within rounding; compile to float tolerance)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from featureatlas.schemas.methods import TopKConfig
from featureatlas.tasks.dictionary.train import train_dictionary
from featureatlas.tasks.tracking.identity import Identity, dictionary_identity
from tests.dictionary.test_topk import plant

BASE = dict(d_sae=64, k=4, batch_size=64, steps=30, log_every=5, device="cpu")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_options_validate():
    with pytest.raises(ValidationError, match="'none' or 'bf16'"):
        TopKConfig(autocast="fp16")
    with pytest.raises(ValidationError, match="checkpoint_every"):
        TopKConfig(checkpoint_every=0)
    assert TopKConfig().autocast == "none" and TopKConfig().compile is False


def test_fingerprints_follow_the_result_not_the_checkpoint_interval():
    cache = Identity("activation_cache", "cache-x", "f" * 64)

    def fp(**kw):
        return dictionary_identity(cache, "h", TopKConfig(**kw)).fingerprint

    assert fp(checkpoint_every=7) == fp()  # checkpoints do not change the dictionary
    assert fp(autocast="bf16") != fp() and fp(compile=True) != fp()
    # a config from before these fields existed: the same fingerprint as the defaults now give
    import hashlib
    import json

    from featureatlas.tasks.tracking.identity import STAGE_VERSIONS

    old = TopKConfig().model_dump(mode="json")
    for key in ("checkpoint_every", "autocast", "compile"):
        old.pop(key)
    payload = {
        "stage": "dictionary",
        "version": STAGE_VERSIONS["dictionary"],
        "config": old | {"hookpoint": "h"},
    }
    payload["inputs"] = [cache.fingerprint]
    assert fp() == hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def test_bf16_autocast_trains_to_the_float32_loss_with_float32_weights():
    acts = plant(400).acts
    fp32 = train_dictionary(TopKConfig(**BASE), acts)
    bf16 = train_dictionary(TopKConfig(**BASE, autocast="bf16"), acts)
    assert bf16.dictionary.W_enc.dtype == torch.float32
    assert bf16.final_metrics["loss"] == pytest.approx(fp32.final_metrics["loss"], rel=0.03)
    assert not torch.equal(bf16.dictionary.W_enc, fp32.dictionary.W_enc)  # autocast did take effect


@pytest.mark.slow  # inductor compiles C++ on CPU: about half a minute warm, minutes cold
def test_compile_gives_the_eager_loss():
    acts = plant(400).acts
    eager = train_dictionary(TopKConfig(**BASE), acts)
    compiled = train_dictionary(TopKConfig(**BASE, compile=True), acts)
    assert compiled.final_metrics["loss"] == pytest.approx(eager.final_metrics["loss"], rel=1e-4)
    for name, tensor in eager.dictionary.state_dict().items():
        torch.testing.assert_close(compiled.dictionary.state_dict()[name], tensor, rtol=1e-4, atol=1e-5)
