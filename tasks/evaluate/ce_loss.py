"""The CE-loss score: how much of the language model's next-token loss survives splicing the dictionary in.

Up to four passes over the same held-out contexts give mean next-token cross-entropies:
  clean   - the model as it is;
  spliced - the hookpoint's output replaced by the dictionary's reconstruction decode(encode(x));
  zero    - the hookpoint's output replaced by zeros (the "ablate everything" baseline);
  mean    - (when the cache's per-dimension mean is given) the output replaced by that mean.
score = (L_zero - L_spliced) / (L_zero - L_clean): 1.0 for a perfect reconstruction, 0.0 for one no better
than zeros; the mean-ablation score is the same with L_mean. Zero ablation is the laxer baseline on the
residual stream (zeros are far off-distribution), so the mean score is usually the lower, more honest one.
Beside the scores: the spliced loss increase L_spliced - L_clean (nats) and the mean KL divergence
KL(clean || spliced) of the next-token distributions over the scored positions.
Position 0 can be left clean in every altered run: it is an attention sink with huge norms that dictionaries
are not trained on, and replacing it would measure the sink rather than the dictionary.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from featureatlas.schemas.base import Contract
from featureatlas.tasks.common.hooks import splice
from featureatlas.tasks.evaluate.metrics import dictionary_placement

log = logging.getLogger(__name__)

__all__ = ["CELossResult", "ce_loss_score", "keep_first", "next_token_loss_sum"]


class CELossResult(Contract):
    """Mean next-token cross-entropy (nats) with and without the dictionary, and the score from them."""

    ce_loss_clean: float = Field(description="Loss of the unmodified model.")
    ce_loss_spliced: float = Field(description="Loss with the hookpoint output reconstructed.")
    ce_loss_zero: float = Field(description="Loss with the hookpoint output replaced by zeros.")
    ce_loss_score: float = Field(description="(L_zero - L_spliced) / (L_zero - L_clean); 1.0 is lossless.")
    ce_loss_mean: float | None = Field(None, description="Loss with the output replaced by the cache mean.")
    ce_loss_score_mean: float | None = Field(
        None, description="(L_mean - L_spliced) / (L_mean - L_clean): the score against mean ablation."
    )
    ce_loss_increase: float = Field(0.0, description="L_spliced - L_clean, in nats per token.")
    kl_spliced: float = Field(
        0.0, description="Mean over scored positions of KL(clean || spliced) of the next-token distribution."
    )
    n_tokens: int = Field(description="Next-token predictions averaged over (both positions real).")


def next_token_loss_sum(logits: Tensor, input_ids: Tensor, attention_mask: Tensor) -> tuple[float, int]:
    """Summed cross-entropy of predicting token t+1 at position t, where both positions are real."""
    # Both ends must be real: with left padding the first real token would be "predicted" from a pad.
    valid = (attention_mask[:, 1:] == 1) & (attention_mask[:, :-1] == 1)
    losses = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).double(), input_ids[:, 1:].flatten(), reduction="none"
    ).view_as(valid)
    return losses[valid].sum().item(), int(valid.sum().item())


def _kl_sum(clean: Tensor, spliced: Tensor, attention_mask: Tensor) -> float:
    """Summed KL(clean || spliced) of next-token distributions where `next_token_loss_sum` scores."""
    valid = (attention_mask[:, 1:] == 1) & (attention_mask[:, :-1] == 1)
    log_p = F.log_softmax(clean[:, :-1][valid].double(), dim=-1)
    log_q = F.log_softmax(spliced[:, :-1][valid].double(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum().item()


def keep_first(new: Tensor, clean: Tensor, first: Tensor | None) -> Tensor:
    """`new`, except that each row's first real position keeps its clean activation."""
    if first is None:
        return new
    rows = torch.arange(new.shape[0], device=new.device)
    new = new.clone()
    new[rows, first] = clean[rows, first]
    return new


def _reconstruct(
    dictionary: nn.Module, first: Tensor | None, source: dict[str, Tensor] | None = None
) -> Callable[[Tensor], Tensor]:
    """The spliced run's replacement: decode(encode(x)) of the site's own output `x`, or, for a transcoder,
    of the input site's activation that `source["x"]` captured earlier in the same forward pass."""

    def fn(out: Tensor) -> Tensor:
        inp = out
        if source is not None:
            if "x" not in source:
                raise ValueError(
                    "the transcoder's input hookpoint did not run before its target hookpoint in the forward "
                    "pass; a transcoder must read a site upstream of the one it replaces"
                )
            inp = source.pop("x")
            if inp.shape[:-1] != out.shape[:-1]:
                raise ValueError(
                    f"the transcoder's input {list(inp.shape)} and target {list(out.shape)} disagree on "
                    "[batch, position]; both hookpoints must be per-token activations"
                )
        if inp.shape[-1] != dictionary.d_in:
            raise ValueError(
                f"the hookpoint's output has width {inp.shape[-1]} but the dictionary's d_in is "
                f"{dictionary.d_in}; evaluate the dictionary at the hookpoint it was trained on"
            )
        # Run in the dictionary's own dtype/device (float32 beside a bfloat16 model, say), then cast back.
        device, dtype = dictionary_placement(dictionary, out.device, out.dtype)
        x_hat = dictionary.decode(dictionary.encode(inp.to(device=device, dtype=dtype)))
        return keep_first(x_hat.to(device=out.device, dtype=out.dtype), out, first)

    return fn


def capture(model: nn.Module, hookpoint: str, into: dict[str, Tensor]):
    """Within the block, store `hookpoint`'s activation of each forward pass in `into["x"]`, unchanged."""

    def keep(x: Tensor) -> None:
        into["x"] = x

    return splice(model, hookpoint, keep)


def _zeros(first: Tensor | None) -> Callable[[Tensor], Tensor]:
    return lambda out: keep_first(torch.zeros_like(out), out, first)


def _constant(value: Tensor, first: Tensor | None) -> Callable[[Tensor], Tensor]:
    def fn(out: Tensor) -> Tensor:
        if out.shape[-1] != value.shape[-1]:
            raise ValueError(
                f"the ablation mean has width {value.shape[-1]} but the hookpoint's output has width "
                f"{out.shape[-1]}; take the mean from the cache of this hookpoint"
            )
        return keep_first(value.to(out).expand_as(out).clone(), out, first)

    return fn


@torch.no_grad()
def ce_loss_score(
    model: nn.Module,
    dictionary: nn.Module,
    hookpoint: str,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    batch_size: int = 8,
    exclude_first_token: bool = True,
    device: torch.device | str = "cpu",
    mean: Tensor | None = None,
    source_hookpoint: str | None = None,
) -> CELossResult:
    """Clean, spliced and zero-ablated mean next-token loss of a causal LM on `input_ids [n_ctx, L]`.

    `attention_mask [n_ctx, L]` marks real tokens (1) and padding (0); losses average over every real
    next-token prediction of all contexts (token-weighted, not per batch). With `exclude_first_token`, each
    context's first real position keeps its clean activation in the spliced and zero runs. The model must
    already be on `device`; it runs in eval mode and is restored to its previous mode afterwards.
    `mean [d_in]` (the cache's per-dimension mean at the hookpoint) adds the mean-ablation baseline.
    A transcoder gives `source_hookpoint`, its input site: the spliced run replaces `hookpoint` (its
    target) by the transcoder's output computed from the source's activation in the same forward pass.
    """
    if input_ids.ndim != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be [n_ctx, L] with L >= 2, got {list(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    elif attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask {list(attention_mask.shape)} must match input_ids {list(input_ids.shape)}"
        )

    totals = {"clean": 0.0, "spliced": 0.0, "zero": 0.0, "mean": 0.0}
    kl_total = 0.0
    n_tokens = 0
    was_training = model.training
    model.eval()  # dropout would make the three runs differ by noise
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[start : start + batch_size].to(device)
            mask = attention_mask[start : start + batch_size].to(device)
            # argmax finds the first 1 in each row: position 0 unless the batch is left-padded.
            first = mask.int().argmax(dim=1) if exclude_first_token else None
            source: dict[str, Tensor] | None = None if source_hookpoint is None else {}
            runs = {
                "clean": None,
                "spliced": _reconstruct(dictionary, first, source),
                "zero": _zeros(first),
            }
            if mean is not None:
                runs["mean"] = _constant(mean, first)
            clean_logits = None
            for name, fn in runs.items():
                if fn is None:
                    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                elif name == "spliced" and source is not None:
                    with capture(model, source_hookpoint, source), splice(model, hookpoint, fn):
                        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                else:
                    with splice(model, hookpoint, fn):
                        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                loss_sum, count = next_token_loss_sum(logits, ids, mask)
                totals[name] += loss_sum
                if name == "clean":
                    clean_logits = logits
                elif name == "spliced":
                    kl_total += _kl_sum(clean_logits, logits, mask)
            n_tokens += count
    finally:
        model.train(was_training)

    if n_tokens == 0:
        raise ValueError("no next-token predictions: every context has fewer than two real tokens")
    clean, spliced, zero, ablated = (totals[k] / n_tokens for k in ("clean", "spliced", "zero", "mean"))
    if math.isclose(zero, clean, rel_tol=1e-9, abs_tol=1e-12):
        raise ValueError(
            f"zeroing hookpoint {hookpoint!r} leaves the loss unchanged ({clean:.6f}): the hookpoint has no "
            "effect on the loss, so the CE-loss score is undefined; pick a hookpoint on the residual path, "
            "e.g. 'model.layers.N'"
        )
    score = (zero - spliced) / (zero - clean)
    # A mean ablation that leaves the loss unchanged gives no score rather than failing the whole evaluation.
    score_mean = None
    if mean is not None and not math.isclose(ablated, clean, rel_tol=1e-9, abs_tol=1e-12):
        score_mean = (ablated - spliced) / (ablated - clean)
    log.info(
        "CE loss at %s: clean=%.4f spliced=%.4f zero=%.4f score=%.4f", hookpoint, clean, spliced, zero, score
    )
    return CELossResult(
        ce_loss_clean=clean,
        ce_loss_spliced=spliced,
        ce_loss_zero=zero,
        ce_loss_score=score,
        ce_loss_mean=ablated if mean is not None else None,
        ce_loss_score_mean=score_mean,
        ce_loss_increase=spliced - clean,
        kl_spliced=kl_total / n_tokens,
        n_tokens=n_tokens,
    )
