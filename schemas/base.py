"""The base of every contract: frozen, closed to unknown keys, with errors that name the allowed keys."""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator


class Contract(BaseModel):
    """A frozen pydantic model that rejects unknown keys with the list of allowed ones.

    pydantic's own `extra="forbid"` error says only "Extra inputs are not permitted"; a researcher who typed
    `dsae:` wants to read "unknown key 'dsae'; did you mean 'd_sae'? allowed: ...".
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        allowed = set(cls.model_fields)
        allowed |= {f.alias for f in cls.model_fields.values() if f.alias}
        unknown = sorted(str(k) for k in data if k not in allowed)
        if unknown:
            key = unknown[0]
            close = difflib.get_close_matches(key, sorted(allowed), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown key {key!r}{hint} allowed keys: {', '.join(sorted(allowed))}")
        return data


def format_validation_error(err: ValidationError) -> str:
    """One line per problem, each starting with the dotted path of the offending key."""
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-"))
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"{path or '<root>'}: {msg}")
    return "\n".join(lines)
