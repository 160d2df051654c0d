"""Steering with a latent: add alpha * d_j / ||d_j|| at the hookpoint and see what the model says.

A raw alpha means little across layers and models, so alpha is chosen by its effect: a binary search finds
the alpha whose next-token KL divergence KL(clean || steered) at the last position of a neutral prompt hits
a target (say 1 nat), for each sign. At that strength the result records the tokens the latent's direction
promotes and suppresses most, and a short greedy continuation of the prompt with the steering left on.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from featureatlas.schemas.evaluation import SteeringResult
from featureatlas.tasks.common.hooks import splice
from featureatlas.tasks.evaluate.metrics import dictionary_placement

log = logging.getLogger(__name__)

__all__ = ["SteeringResult", "decoder_direction", "steer_latent"]


@torch.no_grad()
def decoder_direction(dictionary: nn.Module, latent: int) -> Tensor:
    """Unit vector [d_in] that latent `latent` writes: decode(e_j) - decode(0), normalised."""
    device, dtype = dictionary_placement(dictionary, "cpu", torch.float32)
    codes = torch.zeros(2, dictionary.d_sae, device=device, dtype=dtype)
    codes[0, latent] = 1.0
    out = dictionary.decode(codes)
    d = (out[0] - out[1]).float()
    norm = d.norm()
    if norm == 0:
        raise ValueError(f"latent {latent} decodes to the zero vector, so it has no direction to steer along")
    return d / norm


def _last_logits(model: nn.Module, ids: Tensor, hookpoint: str, vector: Tensor | None) -> Tensor:
    if vector is None:
        return model(input_ids=ids, use_cache=False).logits[0, -1].double()
    with splice(model, hookpoint, lambda out: out + vector.to(out)):
        return model(input_ids=ids, use_cache=False).logits[0, -1].double()


def _kl(clean: Tensor, steered: Tensor) -> float:
    log_p, log_q = F.log_softmax(clean, -1), F.log_softmax(steered, -1)
    return (log_p.exp() * (log_p - log_q)).sum().item()


@torch.no_grad()
def steer_latent(
    model: nn.Module,
    dictionary: nn.Module,
    hookpoint: str,
    prompt_ids: Tensor,
    latent: int,
    *,
    sign: int = 1,
    target_kl: float = 1.0,
    tolerance: float = 0.05,
    max_steps: int = 40,
    top_tokens: int = 5,
    n_new_tokens: int = 8,
    tokenizer=None,
) -> SteeringResult:
    """Binary-search alpha >= 0 so that adding sign * alpha * d_j at `hookpoint` gives KL ~= `target_kl`.

    `prompt_ids [1, L]` is a neutral prompt. alpha doubles from 1 until the KL passes the target, then the
    interval is halved until the KL is within `tolerance * target_kl` or `max_steps` evaluations are spent.
    """
    if sign not in (1, -1):
        raise ValueError(f"sign must be +1 or -1, got {sign}")
    if prompt_ids.ndim != 2 or prompt_ids.shape[0] != 1:
        raise ValueError(f"prompt_ids must be [1, L], got {list(prompt_ids.shape)}")
    if target_kl <= 0:
        raise ValueError(f"target_kl must be > 0, got {target_kl}")
    was_training = model.training
    model.eval()
    try:
        direction = sign * decoder_direction(dictionary, latent)
        clean = _last_logits(model, prompt_ids, hookpoint, None)

        def kl_at(alpha: float) -> float:
            return _kl(clean, _last_logits(model, prompt_ids, hookpoint, alpha * direction))

        lo, hi, steps = 0.0, 1.0, 0
        kl = kl_at(hi)
        steps += 1
        while kl < target_kl and steps < max_steps:
            lo, hi = hi, hi * 2
            kl = kl_at(hi)
            steps += 1
        alpha = hi
        while abs(kl - target_kl) > tolerance * target_kl and steps < max_steps:
            alpha = (lo + hi) / 2
            kl = kl_at(alpha)
            steps += 1
            if kl < target_kl:
                lo = alpha
            else:
                hi = alpha
        vector = alpha * direction
        diff = _last_logits(model, prompt_ids, hookpoint, vector) - clean
        ids = prompt_ids
        with splice(model, hookpoint, lambda out: out + vector.to(out)):
            for _ in range(n_new_tokens):
                next_id = model(input_ids=ids, use_cache=False).logits[0, -1].argmax()
                ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    finally:
        model.train(was_training)
    continuation = ids[0, prompt_ids.shape[1] :].tolist()
    reached = math.isfinite(kl) and abs(kl - target_kl) <= tolerance * target_kl
    if not reached:
        log.warning("steering latent %d (sign %+d): KL %.4f missed target %.4f", latent, sign, kl, target_kl)
    return SteeringResult(
        latent=latent,
        sign=sign,
        alpha=sign * alpha,
        kl=kl,
        target_kl=target_kl,
        reached=reached,
        top_promoted=diff.topk(top_tokens).indices.tolist(),
        top_suppressed=(-diff).topk(top_tokens).indices.tolist(),
        continuation=continuation,
        continuation_text=tokenizer.decode(continuation) if tokenizer is not None else None,
    )
