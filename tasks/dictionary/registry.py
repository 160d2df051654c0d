"""The registry of dictionary methods, keyed by the `method` name that configs and cfg.json files carry.

A method module decorates its class with `@register`; `load_dictionary` reads cfg.json's "method" and hands
the folder to that class, and `build_dictionary` makes a fresh one from a config. No if/elif over classes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from featureatlas.schemas.methods import DictionaryConfig
from featureatlas.tasks.dictionary.base import CFG_NAME, Dictionary, read_cfg_json

METHODS: dict[str, type[Dictionary]] = {}


def register(cls: type[Dictionary]) -> type[Dictionary]:
    """Class decorator: add `cls` to METHODS under `cls.method`, refusing a name that is already taken."""
    if not (isinstance(cls, type) and issubclass(cls, Dictionary)):
        raise TypeError(f"register expects a Dictionary subclass, got {cls!r}")
    name = getattr(cls, "method", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__qualname__} must set a class attribute `method` (its registry name)")
    if name in METHODS:
        taken = METHODS[name]
        raise ValueError(
            f"method {name!r} is already registered to {taken.__module__}.{taken.__qualname__}; "
            f"give {cls.__qualname__} a different `method` name"
        )
    METHODS[name] = cls
    return cls


def _known() -> str:
    return ", ".join(sorted(METHODS)) or "(none registered)"


def load_dictionary(folder: str | Path, device: str | torch.device = "cpu") -> Dictionary:
    """Load any saved dictionary, picking its class from the "method" in `folder`/cfg.json."""
    folder = Path(folder)
    method = read_cfg_json(folder).get("method")
    if method not in METHODS:
        raise ValueError(
            f"{folder / CFG_NAME} names method {method!r}, which is not registered; known methods: {_known()}"
        )
    return METHODS[method].load(folder, device=device)


def build_dictionary(cfg: DictionaryConfig, d_in: int) -> Dictionary:
    """A freshly initialised (untrained) dictionary for `cfg` over `d_in`-dimensional activations."""
    method = getattr(cfg, "method", None)
    if method not in METHODS:
        raise ValueError(f"no dictionary registered for method {method!r}; known methods: {_known()}")
    return METHODS[method](cfg, d_in)
