"""mkdocs hooks of the featureatlas docs site (docs/mkdocs.yml).

- The spec reference (`reference/spec.md`) is generated from the pydantic models of `featureatlas.schemas`
  on every build: each key of a pipeline spec with its type, default and description, so it cannot drift
  from the code.
- `docs/ARCHITECTURE.md` and `docs/OPERATIONS.md` stay where contributors edit them and are published as
  `architecture.md` and `operations.md`; `docs/notebook.ipynb` is published for download.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path

from mkdocs.structure.files import File

DOCS = Path(__file__).resolve().parent
PUBLISHED = {
    "ARCHITECTURE.md": "architecture.md",
    "OPERATIONS.md": "operations.md",
    "notebook.ipynb": "notebook.ipynb",
}


def _models(annotation) -> list[type]:
    """The pydantic model classes an annotation mentions (through unions, lists, Annotated)."""
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models(arg)]


def _type(annotation) -> str:
    """A short, readable type: `int`, `'a' | 'b'`, `list[str]`, links to model sections."""
    from pydantic import BaseModel

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"[{annotation.__name__}](#{annotation.__name__.lower()})"
    if origin is typing.Literal:
        return " \\| ".join(repr(a) for a in args)
    if origin is typing.Annotated:
        return _type(args[0])
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation))


def _default(field) -> str:
    from pydantic import BaseModel
    from pydantic_core import PydanticUndefined

    if field.default_factory is not None:
        made = field.default_factory()
        return "(defaults below)" if isinstance(made, BaseModel) else f"`{made!r}`"
    if field.default is PydanticUndefined:
        return "required"
    return f"`{field.default!r}`"


def _table(model) -> list[str]:
    doc = " ".join((model.__doc__ or "").split())
    head = ["| key | type | default | description |", "|---|---|---|---|"]
    rows = [f"## {model.__name__}", "", doc, "", *head]
    for name, field in model.model_fields.items():
        description = " ".join((field.description or "").split()).replace("|", "\\|")
        if not description and _models(field.annotation):
            description = "See " + ", ".join(_type(m) for m in _models(field.annotation)) + "."
        rows.append(f"| `{name}` | {_type(field.annotation)} | {_default(field)} | {description} |")
    return [*rows, ""]


def spec_reference() -> str:
    """The Markdown of the spec reference: PipelineSpec first, then every model it reaches, breadth first."""
    from featureatlas.schemas.spec import PipelineSpec

    order, queue = [], [PipelineSpec]
    while queue:
        model = queue.pop(0)
        if model in order:
            continue
        order.append(model)
        for field in model.model_fields.values():
            queue.extend(m for m in _models(field.annotation) if m not in order)
    lines = [
        "# Spec reference",
        "",
        "Every key of a pipeline spec (YAML), generated from the pydantic models in `featureatlas.schemas` "
        "when the site is built. A spec is a [PipelineSpec](#pipelinespec); `dictionaries` is a list of "
        "method configs chosen by their `method` key. Unknown keys are refused with the allowed names.",
        "",
    ]
    for model in order:
        lines.extend(_table(model))
    return "\n".join(lines)


def on_files(files, config):
    """Add the generated spec reference and the files published from docs/ itself."""
    files.append(File.generated(config, "reference/spec.md", content=spec_reference()))
    for source, dest in PUBLISHED.items():
        files.append(File.generated(config, dest, abs_src_path=str(DOCS / source)))
    return files
