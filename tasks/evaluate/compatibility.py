"""Refuse to evaluate a dictionary where its figures would mean nothing.

A dictionary read on another model's activations, or at another hookpoint, reconstructs noise; the numbers
would look like a bad dictionary rather than a mistake. So the evaluation checks first, and names both sides:
the model (and hookpoint) the dictionary was trained on, and the ones it is being evaluated on. `force`
lets a deliberate cross-evaluation through (transfer across layers, say); a width mismatch never passes,
since the reconstruction could not even be computed.
"""

from __future__ import annotations

import logging

from featureatlas.schemas.artifacts import ActivationCacheRef, DictionaryRef

log = logging.getLogger(__name__)

__all__ = ["check_dictionary_fits"]


def check_dictionary_fits(
    dictionary: DictionaryRef,
    cache: ActivationCacheRef,
    hookpoint: str,
    trained_model: str | None,
    *,
    force: bool = False,
) -> None:
    """Raise `ValueError` unless `dictionary` can be evaluated at `hookpoint` of `cache`'s model.

    `trained_model` is the id of the model whose cache the dictionary was trained on (from the catalog), or
    None when that cache is unknown here (then only the hookpoint and width are checked).
    """
    if hookpoint not in cache.hookpoints:
        raise ValueError(
            f"hookpoint {hookpoint!r} is not in cache {cache.id}; it holds {cache.hookpoints}. Evaluate on a "
            f"cache of {hookpoint!r}, or at one of those hookpoints"
        )
    problems = []
    if trained_model is not None and trained_model != cache.model.id:
        problems.append(
            f"it was trained on model {trained_model} (via cache {dictionary.cache_id}) but is being "
            f"evaluated on model {cache.model.id} ({cache.model.source})"
        )
    if hookpoint != dictionary.hookpoint:
        problems.append(
            f"it was trained at hookpoint {dictionary.hookpoint!r} but is being evaluated at {hookpoint!r}"
        )
    width = cache.d_in[hookpoint]
    if width != dictionary.d_in:
        raise ValueError(
            f"dictionary {dictionary.id} has d_in {dictionary.d_in} (W_enc [{dictionary.d_in}, "
            f"{dictionary.d_sae}]) but activations at {hookpoint!r} of cache {cache.id} are [n, {width}]"
            + (f"; also, {'; '.join(problems)}" if problems else "")
        )
    if problems and not force:
        raise ValueError(
            f"dictionary {dictionary.id}: {'; '.join(problems)}. Its figures there would be meaningless; "
            "evaluate it on its own model and hookpoint, or set `evaluate.force: true` to do this on purpose"
        )
    for p in problems:
        log.warning("forced evaluation of %s: %s", dictionary.id, p)
