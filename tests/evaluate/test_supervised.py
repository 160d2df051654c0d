"""Supervised reference dictionaries: planted attribute directions are recovered, the figures are exact on a
bag-of-words model whose activations are sums of one-hot word vectors, and F1 matches a hand-worked case."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import Tensor, nn
from transformers import PreTrainedTokenizerFast

from featureatlas.tasks.evaluate.supervised import (
    attribute_scores,
    best_matches,
    fit_mean_codes,
    supervised_evaluation,
)
from featureatlas.tasks.evaluate.templates import TemplateTask, ioi_task
from tests.helpers import IdentityDictionary as Identity
from tests.helpers import build_tiny_llama, build_tiny_tokenizer

# Two names pools that never overlap, so every attribute is independent of the others in `all_prompts`.
TOY = TemplateTask(
    name="toy",
    templates={
        "t0": "{a} and {b} met at the {place} . {b} said hi to",
        "t1": "{b} and {a} met at the {place} . {b} said hi to",
    },
    pools={"a": ("Ann", "Bob", "Cat"), "b": ("Dan", "Eve", "Fay"), "place": ("park", "shop")},
    template_attributes={"t0": {"pos": "a_first"}, "t1": {"pos": "b_first"}},
    answer="a",
    distractor="b",
)


def word_tokenizer(task: TemplateTask, extra: list[str] = ()) -> PreTrainedTokenizerFast:
    """One token per word and punctuation mark of the task's templates and pools (and `extra` words)."""
    words = ["[PAD]"] + sorted(
        {w for t in task.templates.values() for w in re.findall(r"\w+|[^\w\s]", re.sub(r"{\w+}", "", t))}
        | {w for pool in task.pools.values() for w in pool}
        | set(extra)
    )
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[PAD]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]")


class CumSum(nn.Module):
    def forward(self, h: Tensor) -> Tensor:
        return h.cumsum(dim=1)


class BagOfWords(nn.Module):
    """Activation at position t (the `mixer` output) = counts of each word up to t; logits = counts.

    So at the last token the logit difference of a prompt is count(a) - count(b) = 1 - 2 = -1.
    """

    def __init__(self, vocab: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, vocab, _weight=torch.eye(vocab))
        self.mixer = CumSum()
        self.lm_head = nn.Linear(vocab, vocab, bias=False)
        self.lm_head.weight.data = torch.eye(vocab)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, use_cache: bool = False):  # noqa: ARG002
        h = self.embed(input_ids) * (1 if attention_mask is None else attention_mask[..., None])
        return SimpleNamespace(logits=self.lm_head(self.mixer(h)))


class DropWords(nn.Module):
    """Reconstructs x with some coordinates (words) set to zero."""

    def __init__(self, d: int, drop: list[int]):
        super().__init__()
        self.d_in = self.d_sae = d
        self.keep = torch.ones(d)
        self.keep[drop] = 0

    def encode(self, acts: Tensor) -> Tensor:
        return acts * self.keep

    def decode(self, codes: Tensor) -> Tensor:
        return codes


def test_precision_recall_f1_hand_worked():
    # rows' values a a b b; latent 0 on rows {0, 1}; latent 1 on {0, 2, 3}; latent 2 never.
    active = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0]], dtype=torch.bool)
    labels = [{"x": v} for v in "aabb"]
    s = attribute_scores(active, labels, "x", ["a", "b"])
    # latent 1 for a: 1 hit of 3 active (P 1/3), of 2 with a (R 1/2), F1 = 2 (1/6) / (5/6) = 0.4;
    # for b: 2 of 3 (P 2/3), 2 of 2 (R 1), F1 = 2 (2/3) / (5/3) = 0.8.
    expected_p = torch.tensor([[1, 1 / 3, 0], [0, 2 / 3, 0]], dtype=torch.float64)
    expected_r = torch.tensor([[1, 1 / 2, 0], [0, 1, 0]], dtype=torch.float64)
    expected_f1 = torch.tensor([[1, 0.4, 0], [0, 0.8, 0]], dtype=torch.float64)
    torch.testing.assert_close(s.precision, expected_p)
    torch.testing.assert_close(s.recall, expected_r)
    torch.testing.assert_close(s.f1, expected_f1)
    a, b = best_matches("x", s)
    assert (a.value, a.latent, a.f1) == ("a", 0, 1.0)
    assert (b.value, b.latent) == ("b", 1) and b.f1 == pytest.approx(0.8)
    assert b.precision == pytest.approx(2 / 3) and b.recall == 1.0


def test_mean_codes_recover_planted_attribute_directions():
    # a = c + P_color[v] + P_shape[w] + noise over a balanced design (each combination 40 times).
    g = torch.Generator().manual_seed(0)
    d = 16
    c = torch.randn(d, generator=g)
    P_color = {v: torch.randn(d, generator=g) for v in ("red", "green", "blue")}
    P_shape = {w: torch.randn(d, generator=g) for w in ("square", "circle")}
    labels = [{"color": v, "shape": w} for v in P_color for w in P_shape] * 40
    acts = torch.stack([c + P_color[lab["color"]] + P_shape[lab["shape"]] for lab in labels])
    acts = acts + 0.01 * torch.randn(acts.shape, generator=g)
    sup = fit_mean_codes(acts, labels, ["color", "shape"])
    # The codes are the planted directions less their mean over values (what E[a] absorbs).
    for planted, attr in ((P_color, "color"), (P_shape, "shape")):
        centre = torch.stack(list(planted.values())).mean(0)
        for v, direction in planted.items():
            torch.testing.assert_close(sup.codes[attr][v].float(), direction - centre, atol=5e-3, rtol=0)
    residual = acts.double() - sup.reconstruct(labels)
    assert residual.pow(2).mean().sqrt() < 0.012  # only the noise is left
    with pytest.raises(ValueError, match="was not among the fitted prompts"):
        sup.reconstruct([{"color": "pink", "shape": "square"}])


@pytest.fixture(scope="module")
def toy():
    tokenizer = word_tokenizer(TOY)
    return BagOfWords(tokenizer.vocab_size), tokenizer


def test_supervised_and_identity_are_sufficient_necessary_and_controllable(toy):
    model, tokenizer = toy
    prompts = TOY.all_prompts()
    assert len(prompts) == 2 * 3 * 3 * 2
    d = tokenizer.vocab_size
    ev = supervised_evaluation(model, tokenizer, Identity(d), "mixer", TOY, prompts, batch_size=7)
    # LD = 1 - 2 = -1 on every prompt; E[a] has 1/3 of each a-name and 2/3 of each b-name: LD_mean = -1/3.
    assert ev.logit_diff_clean == pytest.approx(-1.0) and ev.logit_diff_mean_ablation == pytest.approx(-1 / 3)
    # Counts are additive in independent attributes: the mean codes reconstruct them exactly.
    assert ev.supervised_fvu == pytest.approx(0.0, abs=1e-12) and ev.dictionary_fvu == 0.0
    for figure in ("supervised_sufficiency", "dictionary_sufficiency", "supervised_necessity",
                   "dictionary_necessity"):  # fmt: skip
        assert getattr(ev, figure) == pytest.approx(1.0), figure
    control = {c.attribute: c for c in ev.control}
    for attr in ("a", "b", "place"):
        assert control[attr].n_edits == len(prompts) and control[attr].kl_unedited > 0.01
        # The swap of mean codes, and of the identity's word latents, both land exactly on the rewritten
        # prompt (the b-name latent is set to its mean on prompts with that name: 2, as b is said twice).
        assert control[attr].supervised == pytest.approx(1.0)
        assert control[attr].dictionary == pytest.approx(1.0)
    # Word order is invisible to a bag of words: editing `pos` changes nothing, so it has no control score.
    assert control["pos"].kl_unedited < 1e-9 and control["pos"].supervised is None
    best = {(m.attribute, m.value): m for m in ev.best_latents}
    vocab = tokenizer.get_vocab()
    for attr in ("a", "b", "place"):
        for value in TOY.values(attr):
            assert best[attr, value].latent == vocab[value] and best[attr, value].f1 == 1.0
    # Nothing detects `pos`: the best are latents on in every prompt, P 1/2 and R 1, F1 2/3.
    assert best["pos", "a_first"].f1 == pytest.approx(2 / 3)


def test_a_dictionary_that_drops_the_subject_is_neither_sufficient_nor_necessary(toy):
    model, tokenizer = toy
    vocab = tokenizer.get_vocab()
    dropper = DropWords(tokenizer.vocab_size, [vocab[w] for w in TOY.pools["b"]])
    ev = supervised_evaluation(model, tokenizer, dropper, "mixer", TOY, TOY.all_prompts())
    # Patched reconstruction has count(b) = 0: LD = 1, sufficiency = (1 + 1/3) / (-1 + 1/3) = -2.
    assert ev.dictionary_sufficiency == pytest.approx(-2.0)
    # a - x_hat + E[x_hat] keeps both b's and a 1/3 share of each a-name: LD = 1/3 - 2 = -5/3,
    # necessity = (-1 + 5/3) / (-2/3) = -1.
    assert ev.dictionary_necessity == pytest.approx(-1.0)
    assert ev.supervised_sufficiency == pytest.approx(1.0)


def test_ioi_task_on_a_tiny_llama():
    # A real transformer: the identity dictionary patched at the last token changes nothing.
    model = build_tiny_llama(seed=0, initializer_range=0.3)
    task = ioi_task()
    prompts = task.sample(16, seed=1)
    tokenizer = word_tokenizer(task)
    assert tokenizer.vocab_size <= 320
    ev = supervised_evaluation(model, tokenizer, Identity(32), "model.layers.1", task, prompts, batch_size=32)
    assert ev.n_prompts == 16 and ev.attributes == ["io", "s", "place", "object", "pos", "frame"]
    assert ev.dictionary_fvu == pytest.approx(0.0, abs=1e-10)
    assert ev.dictionary_sufficiency == pytest.approx(1.0, abs=1e-5)
    assert ev.dictionary_necessity == pytest.approx(1.0, abs=1e-5)
    # ~30 mean codes from 16 prompts overlap: their sum can overshoot, so only its sign is certain here
    assert ev.supervised_fvu >= 0.0
    assert len(ev.best_latents) == sum(len(task.values(a)) for a in task.attributes)
    assert all(0.0 <= m.f1 <= 1.0 for m in ev.best_latents)
    assert {c.attribute for c in ev.control} == set(task.attributes)


def test_names_that_share_a_first_token_are_refused():
    # The tiny BPE tokenizer has no word for the names: " Mary" and " John" both start with the space token.
    task = ioi_task()
    with pytest.raises(ValueError, match="same token"):
        supervised_evaluation(
            build_tiny_llama(), build_tiny_tokenizer(), Identity(32), "model.layers.1", task, task.sample(4)
        )


def test_ioi_prompts_and_counterfactuals():
    task = ioi_task()
    p = task.prompt("io_first_0", {"io": "Mary", "s": "John", "place": "store", "object": "book"})
    assert p.text == "When Mary and John went to the store, John gave the book to"
    assert (p.answer, p.distractor, p.attributes["pos"]) == ("Mary", "John", "io_first")
    swapped = task.counterfactual(p, "pos", "s_first")
    assert swapped.text == "When John and Mary went to the store, John gave the book to"
    assert task.counterfactual(p, "io", "John") is None  # IO and S must differ
    # the next valid IO after Mary is John, which is S here, so the edit moves on to Tom
    assert task.edit_target(p, "io").attributes["io"] == "Tom"
    assert all(q.attributes["io"] != q.attributes["s"] for q in task.sample(200))
    with pytest.raises(ValueError, match="every pool's slot"):
        TemplateTask("bad", {"t": "{a} to"}, {"a": ("x",), "b": ("y",)}, {"t": {}}, "a", "b")
