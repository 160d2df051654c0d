"""The members of a sweep fail independently: a batch of stage outcomes split into results and failures.

A sweep's dictionaries do not depend on each other, so one member's failed training, evaluation or labeling
must not throw away the others' work: `TaskPool.run_each` returns each call's result or exception, `settle`
keeps the results in order (None where a call failed) and records a `StageFailure` per failed call. The run
then ends with every failure listed in its result, and fails as a whole only when nothing at all succeeded.
"""

from __future__ import annotations

from typing import Any

from featureatlas.schemas.artifacts import PipelineResult, StageFailure
from featureatlas.schemas.methods import DictionaryConfig


def one_line(error: BaseException) -> str:
    """The error's first line, with its type when the message is empty."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def member_label(hookpoint: str, cfgs: list[DictionaryConfig]) -> str:
    """'topk d_sae=64 k=4, model.layers.1': what tells the members of a sweep apart."""
    names = []
    for cfg in cfgs:
        k = getattr(cfg, "k", None)
        names.append(f"{cfg.method} d_sae={cfg.d_sae}" + (f" k={k}" if k is not None else ""))
    return f"{' + '.join(names)}, {hookpoint}"


def settle(stage: str, members: list[str], outcomes: list[Any]) -> tuple[list[Any], list[StageFailure]]:
    """Results in order (None for a failed call) and one StageFailure per exception among `outcomes`.

    Raises the first exception when every call failed: nothing of the sweep survived, so the run fails.
    """
    failures = [
        StageFailure(stage=stage, member=m, error=one_line(o))
        for m, o in zip(members, outcomes)
        if isinstance(o, BaseException)
    ]
    if outcomes and len(failures) == len(outcomes):
        raise next(o for o in outcomes if isinstance(o, BaseException))
    return [None if isinstance(o, BaseException) else o for o in outcomes], failures


def summary(result: PipelineResult) -> list[str]:
    """One line per dictionary (what it has) and per failure, for the log and the CLI."""
    lines = []
    for d in result.dictionaries:
        done = ["trained"] + (["evaluated"] if d.evaluation else []) + (["labeled"] if d.labeling else [])
        lines.append(f"ok      {d.dictionary.id} ({d.dictionary.config.method}, {d.dictionary.hookpoint}): "
                     f"{', '.join(done)}")  # fmt: skip
    lines.extend(f"FAILED  {f.stage} [{f.member}]: {f.error}" for f in result.failures)
    return lines
