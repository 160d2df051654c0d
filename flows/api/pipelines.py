"""Run a pipeline from Python, as `featureatlas run` does from the shell, and train one dictionary in memory.

`run` takes a spec (a YAML path, a dict, or a `PipelineSpec`) and returns the `PipelineResult` with every
artifact's reference; a second run of the same spec reuses what is finished. The state (catalog, MLflow
store, artifacts) lives in FEATUREATLAS_HOME (default ./.featureatlas), as for the command line.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

    from featureatlas.flows.plan import PlannedStage
    from featureatlas.schemas.artifacts import PipelineResult
    from featureatlas.schemas.methods import DictionaryConfig
    from featureatlas.schemas.spec import PipelineSpec
    from featureatlas.tasks.dictionary.train import TrainResult

__all__ = ["demo_spec", "load_spec", "plan", "run", "train"]


def demo_spec() -> Path:
    """The embedded demo spec (`featureatlas demo`): SmolLM2-135M, Python's own docs, a TopK SAE."""
    from importlib import resources

    return Path(str(resources.files("featureatlas.flows") / "pipelines" / "demo.yaml"))


def load_spec(path: str | Path) -> PipelineSpec:
    """Read and validate a YAML spec; relative corpus paths are taken from the spec's folder.

    A bad spec raises `SpecError` (a ValueError) naming every wrong key by its path, with the fix.
    """
    from featureatlas.schemas.spec import load_spec as load

    return load(path)


def _spec(spec_or_path: PipelineSpec | dict[str, Any] | str | Path) -> PipelineSpec:
    from featureatlas.schemas.spec import PipelineSpec, parse_spec

    if isinstance(spec_or_path, PipelineSpec):
        return spec_or_path
    if isinstance(spec_or_path, dict):
        return parse_spec(spec_or_path)
    return load_spec(spec_or_path)


def plan(spec_or_path: PipelineSpec | dict[str, Any] | str | Path) -> list[PlannedStage]:
    """The stages a spec builds, in order: each one's artifact identity, inputs, and whether a finished
    artifact with the same fingerprint would be reused (`featureatlas run --plan`). Runs nothing."""
    return _plan(_spec(spec_or_path))


def _plan(spec: PipelineSpec) -> list[PlannedStage]:
    from featureatlas.tasks.tracking.env import configure_environment

    settings = configure_environment()  # before the stages import Prefect and MLflow
    from featureatlas.flows.plan import plan_pipeline

    return plan_pipeline(spec, settings)


def run(
    spec_or_path: PipelineSpec | dict[str, Any] | str | Path, plan: bool = False, progress: bool = False
) -> PipelineResult | list[PlannedStage]:
    """Run a pipeline as a Prefect flow, tracked in MLflow and registered in the catalog.

    `spec_or_path`: a YAML file, a dict of the same keys, or a `PipelineSpec`. Finished stages whose
    fingerprints match are reused. With `plan=True` nothing runs and the plan (see `plan`) is returned.
    `progress` shows the training progress bar.
    """
    spec = _spec(spec_or_path)
    if plan:
        return _plan(spec)
    from featureatlas.tasks.tracking.env import configure_environment

    configure_environment()  # before Prefect and MLflow are imported: state under the home, offline
    from featureatlas.flows.pipeline import pipeline_flow

    return pipeline_flow(spec, progress=progress)


def train(
    cfg: DictionaryConfig | dict[str, Any],
    acts: Tensor,
    *,
    progress: bool = False,
    targets: Tensor | None = None,
) -> TrainResult:
    """Train one dictionary on activations in memory, as the pipeline's trainer does.

    `cfg`: a method config (`TopKConfig(...)`, ...) or a dict such as `{"method": "topk", "d_sae": 256,
    "k": 8}`. `acts` [n, d_in]: any float dtype, on the CPU. `targets` [n, d_in]: a transcoder's outputs.
    Returns the dictionary (CPU, eval mode), its last metrics (fvu, l0, ...) and the steps taken.
    """
    from pydantic import TypeAdapter

    from featureatlas.schemas.methods import DictionaryConfig
    from featureatlas.tasks.dictionary import train_dictionary

    if isinstance(cfg, dict):
        cfg = TypeAdapter(DictionaryConfig).validate_python(cfg)
    return train_dictionary(cfg, acts, progress=progress, targets=targets)
