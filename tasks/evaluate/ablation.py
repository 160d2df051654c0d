"""Latent ablation: what the model loses when one latent's contribution is removed at every position.

For latent j, the hookpoint's output x becomes x - (decode(codes) - decode(codes with j zeroed)): only j's
share of the reconstruction is taken away and the dictionary's error term stays, so the change in the
next-token loss and logits is the latent's own effect, not the dictionary's reconstruction error. Doing this
for every latent costs one forward pass each, so it runs on a chosen set (by default the most frequent ones)
and ranks them by |loss change|.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext

import torch
from torch import Tensor, nn

from featureatlas.schemas.evaluation import LatentAblation
from featureatlas.tasks.common.hooks import capture_activations, splice
from featureatlas.tasks.evaluate.ce_loss import capture, keep_first, next_token_loss_sum
from featureatlas.tasks.evaluate.metrics import dictionary_placement, firing_mask

log = logging.getLogger(__name__)

__all__ = ["LatentAblation", "ablate_latents", "latent_contribution", "most_frequent_latents"]


def latent_contribution(dictionary: nn.Module, x: Tensor, latent: int) -> tuple[Tensor, Tensor]:
    """(contribution of `latent` to decode(encode(x)) [..., d_in], whether it fired [...]), in x's dtype.

    "Fired" is the dictionary's `active` (see `metrics.firing_mask`), as in every other frequency.
    """
    device, dtype = dictionary_placement(dictionary, x.device, x.dtype)
    codes = dictionary.encode(x.to(device=device, dtype=dtype))
    without = codes.clone()
    without[..., latent] = 0
    # decode is affine for every method here (b_dec cancels), but the difference works for any decoder.
    delta = dictionary.decode(codes) - dictionary.decode(without)
    return delta.to(device=x.device, dtype=x.dtype), firing_mask(dictionary, codes)[..., latent].to(x.device)


@torch.no_grad()
def most_frequent_latents(
    model: nn.Module, dictionary: nn.Module, hookpoint: str, input_ids: Tensor, attention_mask: Tensor, n: int
) -> list[int]:
    """The `n` latents firing on the most real positions of the contexts (ties broken by index)."""
    acts = capture_activations(model, [hookpoint], input_ids, attention_mask=attention_mask)[hookpoint]
    device, dtype = dictionary_placement(dictionary, acts.device, acts.dtype)
    codes = dictionary.encode(acts[attention_mask.bool()].to(device=device, dtype=dtype))
    counts = firing_mask(dictionary, codes).sum(0)
    order = sorted(range(counts.numel()), key=lambda j: (-int(counts[j]), j))
    return [j for j in order[:n] if counts[j] > 0]


@torch.no_grad()
def ablate_latents(
    model: nn.Module,
    dictionary: nn.Module,
    hookpoint: str,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    latents: list[int],
    *,
    exclude_first_token: bool = True,
    top_tokens: int = 5,
    source_hookpoint: str | None = None,
) -> list[LatentAblation]:
    """Ablate each of `latents` in turn over `input_ids [n_ctx, L]`; results ranked by |loss_change|.

    For a transcoder, `source_hookpoint` is its input site and `hookpoint` its target: the codes come from
    the input site's activation of the same forward pass, and the latent's share is removed at the target.

    All contexts go through in one batch per latent: keep `n_ctx * L` small (a few thousand tokens).
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    bad = [j for j in latents if not 0 <= j < dictionary.d_sae]
    if bad:
        raise ValueError(f"latents {bad} are outside the dictionary's 0..{dictionary.d_sae - 1}")
    first = attention_mask.int().argmax(dim=1) if exclude_first_token else None
    was_training = model.training
    model.eval()
    try:
        clean = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        clean_loss, count = next_token_loss_sum(clean, input_ids, attention_mask)
        valid = attention_mask[:, :-1].bool() & attention_mask[:, 1:].bool()
        results = []
        for j in latents:
            fired: list[Tensor] = []

            source: dict[str, Tensor] | None = None if source_hookpoint is None else {}

            def remove(
                out: Tensor, j: int = j, fired: list[Tensor] = fired, source: dict | None = source
            ) -> Tensor:
                delta, on = latent_contribution(dictionary, out if source is None else source.pop("x"), j)
                fired.append(on)
                return keep_first(out - delta, out, first)

            sourced = nullcontext() if source is None else capture(model, source_hookpoint, source)
            with sourced, splice(model, hookpoint, remove):
                logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            loss, _ = next_token_loss_sum(logits, input_ids, attention_mask)
            diff = (logits[:, :-1] - clean[:, :-1])[valid].double()
            mean_diff = diff.mean(0)
            results.append(
                LatentAblation(
                    latent=j,
                    frequency=fired[0][:, :-1][valid].double().mean().item(),
                    loss_change=(loss - clean_loss) / count,
                    mean_abs_logit_change=diff.abs().mean().item(),
                    top_promoted=mean_diff.topk(top_tokens).indices.tolist(),
                    top_suppressed=(-mean_diff).topk(top_tokens).indices.tolist(),
                )
            )
    finally:
        model.train(was_training)
    results.sort(key=lambda r: -abs(r.loss_change))
    if results:
        log.info(
            "ablation at %s: strongest latent %d (%+.4f nats)",
            hookpoint,
            results[0].latent,
            results[0].loss_change,
        )
    return results
