"""The `interactions` section of a pipeline spec: Rashomon-set interaction scoring of a table or of a probe on
dictionary latents. Shapes and cross-field checks only (validators never touch the disk).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from featureatlas.schemas.base import Contract

TOKEN_LABELS = ("digit", "capitalized", "punctuation", "space_prefixed")


class InteractionsSpec(Contract):
    """Rashomon-set interaction scoring of a tabular model or of a probe on dictionary latents."""

    enabled: bool = Field(False, description="Run the interaction-scoring stage.")
    source: Literal["table", "dictionary"] = Field(
        "table",
        description="'table': a CSV/Parquet file or scikit-learn dataset (`table`, `target`); "
        "'dictionary': a probe on a dictionary's latent activations predicting the token class `label`.",
    )
    table: str | None = Field(
        None,
        description="A .csv or .parquet file (relative to the spec file's folder) or "
        "'sklearn:breast_cancer', 'sklearn:diabetes' or 'sklearn:wine'.",
    )
    target: str | None = Field(None, description="Target column (default 'target' for sklearn datasets).")
    dictionary: str | int | None = Field(
        None,
        description="source 'dictionary': a catalog id (e.g. 'dict-0123abcd4567'), or the index of one of "
        "this spec's dictionary jobs; default: the spec's only dictionary.",
    )
    label: str | None = Field(
        None,
        description="source 'dictionary': the token class the probe predicts, from the cache's tokens: "
        "'digit', 'capitalized' (a word starting with a capital letter), 'punctuation', 'space_prefixed', or "
        "'token:<text>' (that exact token, e.g. 'token: the').",
    )
    n_latents: int = Field(
        8, ge=2, le=64, description="source 'dictionary': the latents most correlated with the label kept."
    )
    max_tokens: int = Field(
        8192, ge=64, description="source 'dictionary': tokens sampled from the cache (the probe's rows)."
    )
    task: Literal["auto", "classification", "regression"] = Field(
        "auto", description="'auto': classification when the target has at most 10 distinct values."
    )
    reference: Literal["linear", "gradient_boosting", "mlp"] = Field(
        "mlp",
        description="Reference learner: a small torch MLP, gradient boosting, or logistic/ridge regression "
        "(whose logit is additive: every pair then sits inside its null band).",
    )
    model_class: Literal["scaling", "retraining", "both"] = Field(
        "scaling",
        description="Rashomon set: 'scaling' (g(X) = f*(X * m)), 'retraining' (the reference's learner "
        "refit on bootstrap samples with other seeds, kept inside the loss bound) or 'both'.",
    )
    n_retrain: int = Field(20, ge=1, le=500, description="Models refit for the retraining class.")
    rate: float = Field(0.1, gt=0, le=1, description="epsilon = rate * L*: the Rashomon set's loss bound.")
    halo_rates: list[float] = Field(
        default_factory=lambda: [0.05, 0.1, 0.2], description="Rates of the nested rings of the halo plot."
    )
    n_permutations: int = Field(
        30,
        ge=2,
        le=1000,
        description="Row permutations per importance estimate (the paper's code: 30); they are processed in "
        "memory-bounded chunks, and their spread gives each pair's Monte-Carlo error `fis_se`.",
    )
    n_null: int = Field(
        20,
        ge=2,
        le=500,
        description="Null worlds of the band: the reference's learner refitted on targets drawn from an "
        "additive model of the same rows; their FIS spread is what no interaction looks like.",
    )
    null_z: float = Field(
        4.0,
        gt=0,
        description="Half-width of the null band in standard deviations (null spread and the reference's "
        "Monte-Carlo error combined); a pair `interacts` when its reference FIS lies outside.",
    )
    heldout_fraction: float = Field(
        0.3, gt=0, lt=1, description="Share of rows held out; L*, the set and the scores use them."
    )
    max_scale: float = Field(2.0, gt=1, description="Largest per-feature scaling m_i explored.")
    max_pairs: int | None = Field(
        50,
        ge=1,
        description="Score at most this many pairs over the set (each costs a cloud), ranked by "
        "`pair_ranking`; null: every pair.",
    )
    pair_ranking: Literal["reference_fis", "importance"] = Field(
        "reference_fis",
        description="How pairs are chosen under `max_pairs`: the reference's |FIS|, or the smaller of the "
        "two features' permutation importances.",
    )
    plot_pairs: int = Field(10, ge=1, description="Most variable pairs shown in the swarm plot.")
    seed: int = Field(0, description="Seed of the split, the reference fit and the permutations.")

    @field_validator("label")
    @classmethod
    def _label(cls, v: str | None) -> str | None:
        if v is None or v in TOKEN_LABELS or (v.startswith("token:") and len(v) > len("token:")):
            return v
        raise ValueError(
            f"label {v!r} not understood; use one of {', '.join(TOKEN_LABELS)} or 'token:<text>'"
        )

    @model_validator(mode="after")
    def _needs_table(self) -> InteractionsSpec:
        if not self.enabled:
            return self
        if self.source == "table" and (self.dictionary is not None or self.label is not None):
            raise ValueError(
                "interactions: `dictionary` and `label` apply to a probe; add `source: dictionary` (and drop "
                "`table`), or drop them"
            )
        if self.source == "table" and self.table is None:
            raise ValueError(
                "interactions.table is required when interactions are enabled: give a .csv/.parquet path "
                "or 'sklearn:breast_cancer', or set `source: dictionary` with a `label` for a probe on "
                "dictionary latents"
            )
        if self.source == "dictionary":
            if self.label is None:
                raise ValueError(
                    "interactions.label is required with `source: dictionary`: the token class the probe "
                    f"predicts ({', '.join(TOKEN_LABELS)} or 'token:<text>')"
                )
            if self.table is not None:
                raise ValueError(
                    "interactions: `table` and `source: dictionary` exclude each other; drop one"
                )
        return self
