"""The trainer on CUDA: bf16 autocast, torch.compile, a sweep from one pass, and resume from a checkpoint."""

from __future__ import annotations

import pytest
import torch

from featureatlas.schemas.methods import BatchTopKConfig, ReLUConfig, TopKConfig
from featureatlas.tasks.dictionary.train import train_dictionaries, train_dictionary
from tests.dictionary.test_topk import plant

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

BASE = dict(batch_size=256, steps=60, log_every=10, device="cuda")


def test_bf16_autocast_on_cuda_matches_float32():
    acts = plant(4000).acts
    fp32 = train_dictionary(TopKConfig(d_sae=256, k=4, **BASE), acts)
    bf16 = train_dictionary(TopKConfig(d_sae=256, k=4, autocast="bf16", **BASE), acts)
    assert bf16.dictionary.W_enc.dtype == torch.float32
    assert bf16.final_metrics["fvu"] == pytest.approx(fp32.final_metrics["fvu"], rel=0.05, abs=0.01)


def test_compile_on_cuda_matches_eager():
    acts = plant(4000).acts
    eager = train_dictionary(ReLUConfig(d_sae=256, **BASE), acts)
    compiled = train_dictionary(ReLUConfig(d_sae=256, compile=True, **BASE), acts)
    assert compiled.final_metrics["loss"] == pytest.approx(eager.final_metrics["loss"], rel=1e-3)


def test_a_cuda_sweep_equals_each_alone_and_resumes(tmp_path):
    acts = plant(4000).acts
    cfgs = [TopKConfig(d_sae=256, k=4, **BASE), BatchTopKConfig(d_sae=128, k=8, **BASE)]
    alone = [train_dictionary(c, acts) for c in cfgs]
    together = train_dictionaries(cfgs, acts)
    for a, b in zip(alone, together):
        for name, tensor in a.dictionary.state_dict().items():
            torch.testing.assert_close(b.dictionary.state_dict()[name], tensor)

    cfg = cfgs[0].model_copy(update={"checkpoint_every": 20})

    def interrupt(_metrics, step):
        if step == 30:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_dictionary(cfg, acts, on_metrics=interrupt, checkpoint_dir=tmp_path)
    resumed = train_dictionary(cfg, acts, checkpoint_dir=tmp_path)
    for name, tensor in alone[0].dictionary.state_dict().items():
        torch.testing.assert_close(resumed.dictionary.state_dict()[name], tensor)


@pytest.mark.parametrize("method", ["topk", "mp"])
@pytest.mark.parametrize("dead_tokens", [10**9, 1])  # AuxK skipped by the host-side bound / always on
def test_training_step_never_reads_the_device(method, dead_tokens):
    """A whole trainer step (loss, backward, constraint, AdamW, dead counters) between logged steps makes no
    synchronising call: torch's sync debug mode turns any such call into an error. TopK on its dense path,
    the one `compile: true` runs (the sparse path's embedding_bag backward counts segments on the host)."""
    from pydantic import TypeAdapter

    from featureatlas.schemas.methods import DictionaryConfig
    from featureatlas.tasks.dictionary.train import _Member

    acts = plant(4000).acts
    fields = {"method": method, "d_sae": 64, "k": 3, "batch_size": 256, "steps": 100, "log_every": 50}
    if method == "topk":
        fields["dead_tokens"] = dead_tokens
    cfg = TypeAdapter(DictionaryConfig).validate_python(fields | {"device": "cuda"})
    member = _Member(cfg, acts.shape[1], acts.shape[0], torch.device("cuda"), None, None)
    member.prepare(acts)
    if method == "topk":
        member.dictionary.sparse_decoder = False
    batch = acts[:256].cuda()
    member.train_step(batch, 1)  # step 1 reads the first loss back, by design
    member.train_step(batch, 2)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(3, 8):
            member.train_step(batch, step)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
