"""Supervised reference dictionaries (Makelov, Lange, Nanda 2024): what a dictionary should find, if the
attributes of a templated task are what the model uses, and how close the dictionary under test comes.

From the activations `a` at the hookpoint (each prompt's last token) and the prompts' attributes, the mean
codes are `u_0 = E[a]` and `u_{attr,v} = E[a | attr = v] - E[a]`; the supervised reconstruction of a prompt
is `u_0 + sum_attr u_{attr, v(attr)}`. Both it and the dictionary's `decode(encode(a))` are scored by
patching the model at that position:
  sufficiency - the reconstruction patched in: how much of the logit difference survives, relative to mean
                ablation (1: all of it, 0: no better than E[a]);
  necessity   - the features replaced by their mean (a - a_hat + E[a_hat]): how much of the logit difference
                is lost, relative to mean ablation (1: as much as mean ablation);
  control     - attribute v -> v' edited inside the activation (supervised: a - u_{attr,v} + u_{attr,v'};
                dictionary: its best-F1 latent for v zeroed and its best-F1 latent for v' set to that latent's
                mean on prompts with v'), scored by how close the next-token distribution comes to the model's
                on the prompt rewritten with v': 1 - sum KL(cf || edited) / sum KL(cf || unedited).
Latents are matched to attribute values by precision, recall and F1 of "latent active" against "prompt has
the value". Only the last position is patched: it is where the prediction is read, and earlier positions
keep their clean activations, so every figure is about what this one activation carries.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from featureatlas.schemas.evaluation import AttributeControl, AttributeMatch, SupervisedEval
from featureatlas.tasks.common.hooks import splice
from featureatlas.tasks.evaluate.metrics import dictionary_placement, firing_mask
from featureatlas.tasks.evaluate.templates import LabeledPrompt, TemplateTask

log = logging.getLogger(__name__)

MIN_GAP = 0.05  # sufficiency and necessity need |LD_clean - LD_mean| >= MIN_GAP * |LD_clean|

__all__ = [
    "AttributeScores",
    "MeanCodes",
    "attribute_scores",
    "best_matches",
    "fit_mean_codes",
    "supervised_evaluation",
]


@dataclass(frozen=True)
class MeanCodes:
    """The supervised dictionary: `u0 [d_in]` and `codes[attr][value] [d_in]`, float64."""

    u0: Tensor
    codes: dict[str, dict[str, Tensor]]

    def reconstruct(self, labels: list[dict[str, str]]) -> Tensor:
        """`u_0 + sum_attr u_{attr, v(attr)}` for each prompt's labels, `[n, d_in]`."""
        out = self.u0.expand(len(labels), -1).clone()
        for i, lab in enumerate(labels):
            for attr, by_value in self.codes.items():
                if lab[attr] not in by_value:
                    raise ValueError(
                        f"attribute {attr!r} = {lab[attr]!r} was not among the fitted prompts "
                        f"({sorted(by_value)}); fit the codes on prompts covering every value"
                    )
                out[i] += by_value[lab[attr]]
        return out


def fit_mean_codes(acts: Tensor, labels: list[dict[str, str]], attributes: list[str]) -> MeanCodes:
    """Mean codes of `acts [n, d_in]` for the given attributes of each row's `labels`."""
    if acts.ndim != 2 or acts.shape[0] != len(labels) or not labels:
        raise ValueError(f"need one label dict per activation row, got {len(labels)} for {list(acts.shape)}")
    acts = acts.double()
    u0 = acts.mean(0)
    codes: dict[str, dict[str, Tensor]] = {}
    for attr in attributes:
        column = [lab[attr] for lab in labels]
        codes[attr] = {}
        for value in dict.fromkeys(column):
            rows = torch.tensor([c == value for c in column], device=acts.device)
            codes[attr][value] = acts[rows].mean(0) - u0
    return MeanCodes(u0, codes)


class AttributeScores(NamedTuple):
    """Per (value, latent) figures of "latent active" detecting "attribute = value", `[n_values, F]` each."""

    values: list[str]
    precision: Tensor
    recall: Tensor
    f1: Tensor


def attribute_scores(active: Tensor, labels: list[dict[str, str]], attribute: str, values: list[str]):
    """Precision, recall and F1 of each latent (`active [n, F]` bool) against each value of `attribute`.

    A latent never active has precision 0; a value no prompt has has recall 0; F1 is 0 where both are 0.
    """
    has = torch.tensor([[lab[attribute] == v for lab in labels] for v in values], dtype=torch.float64)
    act = active.to(device=has.device, dtype=torch.float64)
    hits = has @ act  # [n_values, F]: prompts with the value on which the latent is active
    precision = hits / act.sum(0).clamp(min=1)
    recall = hits / has.sum(1, keepdim=True).clamp(min=1)
    f1 = torch.where(hits > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-300), 0.0)
    return AttributeScores(values, precision, recall, f1)


class _Prompts(NamedTuple):
    ids: Tensor  # [n, L], right-padded
    mask: Tensor  # [n, L]
    last: Tensor  # [n]: index of the last real token
    answer: Tensor  # [n]: first token of " " + answer
    distractor: Tensor  # [n]


def _first_token(tokenizer, word: str) -> int:
    ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"the tokenizer turns {word!r} into no tokens; the task needs words it can encode")
    return ids[0]


def _tokenize(tokenizer, prompts: list[LabeledPrompt], device: torch.device | str) -> _Prompts:
    rows = [tokenizer(p.text)["input_ids"] for p in prompts]
    length = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    answer = torch.tensor([_first_token(tokenizer, p.answer) for p in prompts])
    distractor = torch.tensor([_first_token(tokenizer, p.distractor) for p in prompts])
    same = (answer == distractor).nonzero().flatten().tolist()
    if same:
        p = prompts[same[0]]
        raise ValueError(
            f"the tokenizer starts {p.answer!r} and {p.distractor!r} with the same token, so their logit "
            "difference is always 0; use a tokenizer in which the task's words are single tokens (GPT-2, "
            "Llama and SmolLM2 tokenizers are)"
        )
    lengths = torch.tensor([len(r) for r in rows])
    return _Prompts(ids.to(device), mask.to(device), (lengths - 1).to(device), answer, distractor)


@torch.no_grad()
def _run(
    model: nn.Module, hookpoint: str, p: _Prompts, patch: Tensor | None, batch_size: int
) -> tuple[Tensor, Tensor]:
    """(clean last-token activations [n, d_in], last-token logits [n, vocab] float64), optionally with
    `patch [n, d_in]` written over the last token's activation."""
    acts, logits = [], []
    for start in range(0, p.ids.shape[0], batch_size):
        stop = min(start + batch_size, p.ids.shape[0])
        last = p.last[start:stop]
        rows = torch.arange(stop - start, device=last.device)

        def fn(out: Tensor, rows: Tensor = rows, last: Tensor = last, start: int = start) -> Tensor | None:
            acts.append(out[rows, last].detach().double().cpu())
            if patch is None:
                return None
            new = out.clone()
            new[rows, last] = patch[start : start + rows.numel()].to(device=out.device, dtype=out.dtype)
            return new

        with splice(model, hookpoint, fn):
            out = model(input_ids=p.ids[start:stop], attention_mask=p.mask[start:stop], use_cache=False)
        logits.append(out.logits[rows, last].double().cpu())
    return torch.cat(acts), torch.cat(logits)


def _logit_diff(logits: Tensor, p: _Prompts) -> float:
    rows = torch.arange(logits.shape[0])
    return (logits[rows, p.answer] - logits[rows, p.distractor]).mean().item()


def _kl(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    log_p, log_q = F.log_softmax(p_logits, -1), F.log_softmax(q_logits, -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _fvu(acts: Tensor, recon: Tensor) -> float:
    return ((acts - recon) ** 2).sum().item() / max(((acts - acts.mean(0)) ** 2).sum().item(), 1e-300)


def _codes_and_decode(dictionary: nn.Module, acts: Tensor):
    device, dtype = dictionary_placement(dictionary, "cpu", torch.float32)

    def encode(x: Tensor) -> Tensor:
        return dictionary.encode(x.to(device=device, dtype=dtype))

    def decode(c: Tensor) -> Tensor:
        return dictionary.decode(c).double().cpu()

    return encode(acts), decode


class _Setting(NamedTuple):
    """What every patched run of one evaluation shares."""

    model: nn.Module
    tokenizer: object
    hookpoint: str
    batch_size: int
    device: torch.device | str

    def run(self, prompts: _Prompts, patch: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return _run(self.model, self.hookpoint, prompts, patch, self.batch_size)

    def tokenize(self, prompts: list[LabeledPrompt]) -> _Prompts:
        return _tokenize(self.tokenizer, prompts, self.device)


@torch.no_grad()
def supervised_evaluation(
    model: nn.Module,
    tokenizer,
    dictionary: nn.Module,
    hookpoint: str,
    task: TemplateTask,
    prompts: list[LabeledPrompt],
    *,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
) -> SupervisedEval:
    """Fit mean codes on `prompts` of `task` (e.g. `task.sample(64)`) and score them and `dictionary`.

    The model must already be on `device`; it runs in eval mode and is restored to its mode afterwards.
    """
    if len(prompts) < 2:
        raise ValueError(f"supervised evaluation needs at least 2 prompts, got {len(prompts)}")
    setting = _Setting(model, tokenizer, hookpoint, batch_size, device)
    was_training = model.training
    model.eval()
    try:
        labels = [pr.attributes for pr in prompts]
        batch = setting.tokenize(prompts)
        acts, clean = setting.run(batch)
        if acts.shape[1] != dictionary.d_in:
            raise ValueError(
                f"the hookpoint's output has width {acts.shape[1]} but the dictionary's d_in is "
                f"{dictionary.d_in}; evaluate the dictionary at the hookpoint it was trained on"
            )
        supervised = fit_mean_codes(acts, labels, task.attributes)
        sup_hat = supervised.reconstruct(labels)
        codes, decode = _codes_and_decode(dictionary, acts)
        dict_hat = decode(codes)

        def ld(patch: Tensor) -> float:
            return _logit_diff(setting.run(batch, patch)[1], batch)

        ld_clean, ld_mean = _logit_diff(clean, batch), ld(supervised.u0.expand_as(acts))
        gap = ld_clean - ld_mean
        # Where mean ablation hardly moves the logit difference, this activation does not carry the task
        # (later layers fetch it from other positions) and the ratios would only amplify noise.
        defined = abs(gap) >= max(1e-6, MIN_GAP * abs(ld_clean))

        def sufficiency(hat: Tensor) -> float | None:
            return (ld(hat) - ld_mean) / gap if defined else None

        def necessity(hat: Tensor) -> float | None:
            return (ld_clean - ld(acts - hat + hat.mean(0))) / gap if defined else None

        active = firing_mask(dictionary, codes).cpu()
        scores = {a: attribute_scores(active, labels, a, task.values(a)) for a in task.attributes}
        edit = _Editor(setting, task, prompts, acts, clean, supervised, codes, decode)
        control = [edit.control(a, scores[a]) for a in task.attributes]
        result = SupervisedEval(
            task=task.name,
            n_prompts=len(prompts),
            attributes=task.attributes,
            logit_diff_clean=ld_clean,
            logit_diff_mean_ablation=ld_mean,
            supervised_fvu=_fvu(acts, sup_hat),
            dictionary_fvu=_fvu(acts, dict_hat),
            supervised_sufficiency=sufficiency(sup_hat),
            dictionary_sufficiency=sufficiency(dict_hat),
            supervised_necessity=necessity(sup_hat),
            dictionary_necessity=necessity(dict_hat),
            control=control,
            best_latents=[m for a in task.attributes for m in best_matches(a, scores[a])],
        )
    finally:
        model.train(was_training)
    log.info(
        "supervised %s at %s: sufficiency supervised=%s dictionary=%s",
        task.name,
        hookpoint,
        result.supervised_sufficiency,
        result.dictionary_sufficiency,
    )
    return result


def best_matches(attribute: str, scores: AttributeScores) -> list[AttributeMatch]:
    """The highest-F1 latent of every value (the lowest index on ties)."""
    top = scores.f1.argmax(dim=1)
    return [
        AttributeMatch(
            attribute=attribute,
            value=value,
            latent=int(top[i]),
            precision=scores.precision[i, top[i]].item(),
            recall=scores.recall[i, top[i]].item(),
            f1=scores.f1[i, top[i]].item(),
        )
        for i, value in enumerate(scores.values)
    ]


@dataclass(frozen=True)
class _Editor:
    """Attribute edits inside the activation, by the supervised codes and by the dictionary's latents."""

    setting: _Setting
    task: TemplateTask
    prompts: list[LabeledPrompt]
    acts: Tensor  # [n, d_in] float64, clean
    clean: Tensor  # [n, vocab] clean last-token logits
    supervised: MeanCodes
    codes: Tensor  # [n, d_sae] the dictionary's codes of acts
    decode: object

    def control(self, attribute: str, scores: AttributeScores) -> AttributeControl:
        """Edit `attribute` to its next valid value in every prompt, scored against the rewritten prompts."""
        # only to values the prompts have, so that both u_{attr,v'} and the best latent for v' are known
        seen = set(self.supervised.codes[attribute])
        pairs = [(i, self.task.edit_target(pr, attribute, seen)) for i, pr in enumerate(self.prompts)]
        pairs = [(i, cf) for i, cf in pairs if cf is not None]
        if not pairs:
            raise ValueError(f"no prompt of task {self.task.name!r} can have {attribute!r} edited")
        idx = torch.tensor([i for i, _ in pairs])
        olds = [self.prompts[i].attributes[attribute] for i, _ in pairs]
        news = [cf.attributes[attribute] for _, cf in pairs]
        _, cf_logits = self.setting.run(self.setting.tokenize([cf for _, cf in pairs]))
        sub = self.setting.tokenize([self.prompts[i] for i in idx.tolist()])
        acts = self.acts[idx]
        # supervised: swap u_{attr,v} for u_{attr,v'}
        by_value = self.supervised.codes[attribute]
        shift = torch.stack([by_value[n] - by_value[o] for o, n in zip(olds, news, strict=True)])
        sup_logits = self.setting.run(sub, acts + shift)[1]
        # dictionary: zero the best latent for v, set the best latent for v' to its mean on prompts with v'
        dev = self.codes.device
        latent = scores.f1.argmax(dim=1).to(dev)  # best latent of each value
        pos = {v: k for k, v in enumerate(scores.values)}
        mean_on = {
            v: self.codes[torch.tensor([p.attributes[attribute] == v for p in self.prompts], device=dev)][
                :, latent[pos[v]]
            ].mean()
            for v in set(news)
        }
        codes = self.codes[idx.to(dev)]
        edited = codes.clone()
        rows = torch.arange(len(pairs), device=dev)
        edited[rows, latent[[pos[o] for o in olds]]] = 0
        edited[rows, latent[[pos[n] for n in news]]] = torch.stack([mean_on[n] for n in news]).to(edited)
        dict_logits = self.setting.run(sub, acts + self.decode(edited) - self.decode(codes))[1]
        base = _kl(cf_logits, self.clean[idx]).sum().item()

        def score(logits: Tensor) -> float | None:
            # An attribute the next-token distribution ignores leaves nothing to control.
            return None if base < 1e-9 * len(pairs) else 1.0 - _kl(cf_logits, logits).sum().item() / base

        return AttributeControl(
            attribute=attribute,
            n_edits=len(pairs),
            kl_unedited=base / len(pairs),
            supervised=score(sup_logits),
            dictionary=score(dict_logits),
        )
