"""Paths built from names keep inside their folder: an artifact name cannot climb out with `../`.

Names come from manifests, specs and artifact ids, any of which could be edited by hand or crafted;
`inside` refuses absolute names, `..` parts and anything that resolves (through links too) outside `root`.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath


def check_name(name: str) -> str:
    """`name` itself if it is a relative path without `..` parts; else ValueError saying why."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if not name or name.startswith(("/", "\\")) or (parts and ":" in parts[0]) or ".." in parts:
        raise ValueError(
            f"artifact name {name!r} would leave its folder (absolute, or with '..'); use a plain relative "
            "name such as 'acts/00000.safetensors'"
        )
    return name


def inside(root: Path, *names: str) -> Path:
    """`root / names...`, guaranteed to lie within `root` once resolved."""
    path = root.joinpath(*(check_name(str(n)) for n in names))
    resolved, base = path.resolve(), root.resolve()
    if resolved != base and base not in resolved.parents:
        raise ValueError(f"{path} resolves to {resolved}, outside {base}; refusing to use it")
    return path
