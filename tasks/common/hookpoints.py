"""Hookpoint names: a module name, or an alias for a common site that resolves on each architecture.

Aliases (`L` is a block index):
    resid_post.L   output of block L (the residual stream after it)
    mlp_out.L      the MLP's output: what it adds to the residual stream (BERT: before the add-and-LayerNorm)
    mlp_hidden.L   the MLP's hidden activation: the *input* of its down-projection (read with a pre-hook)
    attn_out.L     the attention block's output: what it adds to the residual stream (BERT: before add-and-LN)
    attn_z.L       per-head outputs before the output projection: the *input* of o_proj, [.., heads * d_head]
                   with head h at columns [h * d_head, (h + 1) * d_head)

They resolve by the module layout of Llama-style (Llama, Gemma, Mistral, Qwen: `model.layers.L.self_attn`,
`.mlp.down_proj`), GPT-2-style (`transformer.h.L.attn.c_proj`, `.mlp.c_proj`) and BERT-style
(`encoder.layer.L.attention.output.dense`, `.output.dense`) models, so a spec can say `mlp_hidden.6` without
knowing which. A `Site` says which module to hook and whether its input or its output is the activation.
"""

from __future__ import annotations

import difflib
import re
from typing import Literal, NamedTuple

from torch import nn

__all__ = ["ALIASES", "Site", "resolve_site"]

HINT = (
    "e.g. 'model.layers.N' is the output of decoder block N (the residual stream after it); aliases "
    "resid_post.N, mlp_out.N, mlp_hidden.N, attn_out.N, attn_z.N work on Llama-, Gemma-, GPT-2- and "
    "BERT-style models"
)

# Where each alias lives inside a block, tried in order: (module path relative to the block, read input?).
# "" is the block itself.
ALIASES: dict[str, list[tuple[str, bool]]] = {
    "resid_post": [("", False)],
    "mlp_out": [("mlp", False), ("output.dense", False)],
    "mlp_hidden": [
        ("mlp.down_proj", True),
        ("mlp.c_proj", True),
        ("mlp.fc2", True),
        ("mlp.dense_4h_to_h", True),
        ("output.dense", True),
    ],
    "attn_out": [("self_attn", False), ("attn", False), ("attention.output.dense", False)],
    "attn_z": [
        ("self_attn.o_proj", True),
        ("attn.c_proj", True),
        ("self_attn.out_proj", True),
        ("attention.output.dense", True),
    ],
}

# Where the list of blocks lives, for the architectures above (with and without a task head around them).
_BLOCK_LISTS = (
    "model.layers",
    "layers",
    "model.model.layers",
    "transformer.h",
    "h",
    "bert.encoder.layer",
    "encoder.layer",
    "roberta.encoder.layer",
    "gpt_neox.layers",
    "model.decoder.layers",
)

_ALIAS_RE = re.compile(rf"^({'|'.join(ALIASES)})\.(\d+)$")


class Site(NamedTuple):
    """A resolved hookpoint: the module to hook and which of its tensors is the activation."""

    name: str  # what the user wrote (a module name or an alias)
    module_name: str  # the module's name in model.named_modules()
    module: nn.Module
    read: Literal["output", "input"]  # "input": the first positional argument, read by a forward pre-hook
    n_heads: int | None = None  # attn_z only: the head layout of the last dimension
    d_head: int | None = None

    def layout(self) -> dict:
        """What the manifest records about where the rows came from."""
        out: dict = {"module": self.module_name, "read": self.read}
        if self.n_heads is not None:
            out |= {"n_heads": self.n_heads, "d_head": self.d_head}
        return out


def _head_layout(model: nn.Module) -> tuple[int | None, int | None]:
    cfg = getattr(model, "config", None)
    n_heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
    if not n_heads:
        return None, None
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    d_head = getattr(cfg, "head_dim", None) or (hidden // n_heads if hidden else None)
    return int(n_heads), (int(d_head) if d_head else None)


def _resolve_alias(model: nn.Module, name: str, alias: str, layer: int) -> Site:
    modules = dict(model.named_modules())
    blocks_name = next(
        (b for b in _BLOCK_LISTS if isinstance(modules.get(b), nn.ModuleList)),
        None,
    )
    if blocks_name is None:
        raise ValueError(
            f"alias {name!r} cannot resolve on {type(model).__name__}: no list of blocks at any of "
            f"{list(_BLOCK_LISTS)}; use a module name from model.named_modules() instead"
        )
    n_blocks = len(modules[blocks_name])
    if layer >= n_blocks:
        raise ValueError(
            f"alias {name!r}: {type(model).__name__} has {n_blocks} blocks ({blocks_name}.0 to "
            f"{blocks_name}.{n_blocks - 1}); pick a layer index below {n_blocks}"
        )
    block = f"{blocks_name}.{layer}"
    for rel, read_input in ALIASES[alias]:
        module_name = f"{block}.{rel}" if rel else block
        if module_name in modules:
            n_heads, d_head = _head_layout(model) if alias == "attn_z" else (None, None)
            return Site(
                name, module_name, modules[module_name], "input" if read_input else "output", n_heads, d_head
            )
    tried = [f"{block}.{rel}" for rel, _ in ALIASES[alias]]
    children = sorted(n.removeprefix(block + ".") for n in modules if n.startswith(block + "."))
    raise ValueError(
        f"alias {name!r} cannot resolve on {type(model).__name__}: block {block} has none of {tried} "
        f"(its modules: {children[:20]}); hook a module by name instead"
    )


def resolve_site(model: nn.Module, name: str) -> Site:
    """The `Site` for a module name or an alias; a ValueError with close matches (or the reason) if none."""
    modules = dict(model.named_modules())
    if name in modules:
        return Site(name, name, modules[name], "output")
    match = _ALIAS_RE.match(name)
    if match:
        return _resolve_alias(model, name, match.group(1), int(match.group(2)))
    close = difflib.get_close_matches(name, [n for n in modules if n], n=5, cutoff=0.6)
    suggestion = f"close matches: {close}" if close else "no close matches"
    raise ValueError(
        f"hookpoint {name!r} not found in {type(model).__name__}; {suggestion}. "
        f"Hookpoints are module names from model.named_modules() or aliases; {HINT}."
    )
