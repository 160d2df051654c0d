"""Codes as the labeling passes see them: only the codes that count as firing, the rest zeroed.

An SAE's code is firing when it is > 0. Semi-NMF's token weights G are never exactly zero (a non-negative
least-squares solve leaves small residues), so a dictionary may say which codes fire through
`Dictionary.active(codes) -> bool mask`; labeling zeroes the others, and every later step (frequency, top
contexts, histograms, silent rows, co-occurrence) keeps reading "code > 0" as "fires".
"""

from __future__ import annotations

from torch import Tensor, nn

from featureatlas.tasks.dictionary.base import Dictionary

__all__ = ["firing_codes"]


def firing_codes(dictionary: nn.Module, acts: Tensor) -> Tensor:
    """`dictionary.encode(acts)` in float32, with the codes its `active` mask rejects set to 0."""
    codes = dictionary.encode(acts).float()
    active = getattr(type(dictionary), "active", None)
    if active is None or active is Dictionary.active:  # plain "> 0": nothing to mask (and no extra pass)
        return codes
    return codes * dictionary.active(codes)
