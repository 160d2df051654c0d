"""The richer figures of an evaluation, nested in `EvalReport.details`: whole-set direction and sparsity
figures, the mean-ablation CE-loss baseline and KL, features as causes (ablation and steering), the
geometry of the decoder directions and the comparison with a supervised reference dictionary.

They live apart from `schemas/artifacts.py` so the report keeps its flat headline fields and older reports
(without details) still load.
"""

from __future__ import annotations

from pydantic import Field

from featureatlas.schemas.base import Contract


class LatentAblation(Contract):
    """The effect of removing one latent's contribution at every position."""

    latent: int = Field(description="Index of the ablated latent.")
    frequency: float = Field(description="Share of scored positions where the latent fired.")
    loss_change: float = Field(description="Mean next-token loss ablated minus clean (nats).")
    mean_abs_logit_change: float = Field(description="Mean over positions and vocabulary of |delta logit|.")
    top_promoted: list[int] = Field(description="Token ids whose mean logit rose most when ablating.")
    top_suppressed: list[int] = Field(description="Token ids whose mean logit fell most when ablating.")


class SteeringResult(Contract):
    """One latent steered in one direction, at the strength that hits the KL target."""

    latent: int = Field(description="Index of the steered latent.")
    sign: int = Field(description="+1 adds the decoder direction, -1 subtracts it.")
    alpha: float = Field(description="Norm of the added vector (signed), in the hookpoint's units.")
    kl: float = Field(description="KL(clean || steered) of the next-token distribution at the prompt's end.")
    target_kl: float = Field(description="The KL the search aimed at.")
    reached: bool = Field(description="Whether |kl - target_kl| <= tolerance * target_kl.")
    top_promoted: list[int] = Field(description="Token ids whose last-position logit rose most.")
    top_suppressed: list[int] = Field(description="Token ids whose last-position logit fell most.")
    continuation: list[int] = Field(description="Greedy continuation of the prompt, steered.")
    continuation_text: str | None = Field(None, description="Continuation, decoded if given a tokenizer.")


class DecoderGeometry(Contract):
    """Euclidean overlap figures of the unit, unwhitened decoder directions (not the atomic inner product)."""

    n_directions: int = Field(description="Latents with a nonzero decoder direction.")
    coherence: float = Field(description="Max |cos| between two different latents' decoder directions.")
    mean_max_cosine: float = Field(description="Mean over latents of the |cos| to the nearest other latent.")
    duplicate_fraction: float = Field(description="Share of latents with a neighbour above the threshold.")
    duplicate_threshold: float = Field(description="|cos| above which two latents count as duplicates.")
    neuron_alignment: float = Field(description="Mean over latents of max_k |d_j[k]| (1: neuron basis).")


class AtomicGeometry(Contract):
    """Coherence of the whitened decoder directions S^(1/2) d_j, S = (E[x x^T] + lambda I)^-1, and the share
    of latents meeting the uniqueness condition mu_i < 1/(2K - 1); the neuron basis e_k is the baseline."""

    ridge: float = Field(description="lambda as a fraction of the mean eigenvalue tr(E[x x^T]) / d_in.")
    lambda_value: float = Field(description="The lambda added to E[x x^T], in squared activation units.")
    n_directions: int = Field(description="Latents with a nonzero decoder direction.")
    k: float = Field(description="K of the uniqueness condition: the dictionary's L0 on the held-out tokens.")
    bound: float = Field(description="1 / (2K - 1) (1 when K <= 1).")
    max_coherence: float = Field(description="max_i mu_i, mu_i = max_{j != i} |<u_i, u_j>| (whitened, unit).")
    mean_coherence: float = Field(description="Mean over latents of mu_i.")
    unique_fraction: float = Field(description="Share of latents with mu_i < 1 / (2K - 1).")
    neuron_max_coherence: float = Field(description="max mu_k of the whitened neuron basis S^(1/2) e_k.")
    neuron_mean_coherence: float = Field(description="Mean mu_k of the whitened neuron basis.")
    neuron_unique_fraction: float = Field(description="Share of neurons with mu_k < 1 / (2K - 1), same K.")
    neuron_l0: float = Field(description="The neuron basis's own L0: mean nonzero coordinates of x.")
    neuron_unique_fraction_own_l0: float = Field(
        description="Share of neurons with mu_k < 1 / (2 neuron_l0 - 1)."
    )


class AttributeMatch(Contract):
    """The dictionary latent that best detects one attribute value (active on the prompts that have it)."""

    attribute: str = Field(description="Attribute name, e.g. 'io'.")
    value: str = Field(description="Attribute value, e.g. 'Mary'.")
    latent: int = Field(description="Latent with the highest F1 for this value.")
    precision: float = Field(description="Share of the prompts it is active on that have the value.")
    recall: float = Field(description="Share of the prompts with the value that it is active on.")
    f1: float = Field(description="Harmonic mean of precision and recall.")


class AttributeControl(Contract):
    """Editing one attribute v -> v' (the next valid value) in the activation, scored against the prompt
    actually rewritten to v': control = 1 - sum KL(cf || edited) / sum KL(cf || unedited)."""

    attribute: str = Field(description="Edited attribute.")
    n_edits: int = Field(description="Prompts edited (those with a valid counterfactual).")
    kl_unedited: float = Field(description="Mean KL(counterfactual || clean) at the last position, nats.")
    supervised: float | None = Field(
        description="Control of the supervised dictionary (swap u_{a,v} for u_{a,v'}); None when the edit "
        "leaves the next-token distribution unchanged (kl_unedited ~ 0)."
    )
    dictionary: float | None = Field(
        description="Control of the dictionary: best-F1 latent for v zeroed, best-F1 latent for v' set to "
        "its mean activation on prompts with v'; None as above."
    )


class SupervisedEval(Contract):
    """Supervised reference dictionary of mean codes on a templated task, against the dictionary under test.

    Activations are read at the hookpoint at each prompt's last token and patched there. LD is the mean
    logit difference logit(answer) - logit(distractor); mean ablation sets the activation to u_0 = E[a].
    sufficiency = (LD_patched - LD_mean) / (LD_clean - LD_mean) with the reconstruction patched in;
    necessity = (LD_clean - LD_removed) / (LD_clean - LD_mean) with a - a_hat + E[a_hat] patched in (the
    features replaced by their mean); both are None when |LD_clean - LD_mean| < 5% of |LD_clean| (mean
    ablation of this one activation hardly moves the task, so there is nothing to recover).
    """

    task: str = Field(description="Template task, e.g. 'ioi'.")
    n_prompts: int = Field(description="Prompts the codes were fit and scored on.")
    attributes: list[str] = Field(description="Attributes the supervised dictionary has codes for.")
    logit_diff_clean: float = Field(description="Mean LD of the unmodified model.")
    logit_diff_mean_ablation: float = Field(description="Mean LD with the activation set to E[a].")
    supervised_fvu: float = Field(description="FVU of u_0 + sum_a u_{a,v(a)} on the prompts' activations.")
    dictionary_fvu: float = Field(description="FVU of decode(encode(a)) on the prompts' activations.")
    supervised_sufficiency: float | None = Field(description="Sufficiency of the supervised dictionary.")
    dictionary_sufficiency: float | None = Field(description="Sufficiency of the dictionary.")
    supervised_necessity: float | None = Field(description="Necessity of the supervised dictionary.")
    dictionary_necessity: float | None = Field(description="Necessity of the dictionary.")
    control: list[AttributeControl] = Field(description="One entry per attribute.")
    best_latents: list[AttributeMatch] = Field(description="Best-F1 latent of every attribute value.")


class EvalDetails(Contract):
    """Everything an evaluation measures beyond the headline fields of `EvalReport`."""

    fvu_batch_mean: float = Field(
        description="Older FVU: mean over batches of per-batch FVU (biased; for comparison with old figures)."
    )
    cosine_similarity: float = Field(description="Mean over tokens of cos(x, x_hat).")
    norm_ratio: float = Field(description="Mean over tokens of ||x_hat|| / ||x||.")
    dense_fraction: float = Field(description="Share of latents firing on more than `dense_threshold`.")
    dense_threshold: float = Field(description="Firing frequency above which a latent counts as dense.")
    freq_hist_edges: list[float] = Field(description="log10 firing-frequency bin edges.")
    freq_hist_counts: list[int] = Field(description="Live latents per bin; dead ones are in dead_fraction.")
    ce_loss_mean: float | None = Field(None, description="Loss with the hookpoint set to the cache mean.")
    ce_loss_score_mean: float | None = Field(
        None, description="(L_mean - L_spliced) / (L_mean - L_clean): the score against mean ablation."
    )
    ce_loss_increase: float = Field(description="L_spliced - L_clean, nats per token.")
    kl_spliced: float = Field(description="Mean KL(clean || spliced) of next-token distributions.")
    ablations: list[LatentAblation] = Field(
        default_factory=list, description="Chosen latents ablated one at a time, ranked by |loss change|."
    )
    steering: list[SteeringResult] = Field(
        default_factory=list, description="Chosen latents steered to the KL target, both signs."
    )
    geometry: DecoderGeometry | None = Field(
        None,
        description="Euclidean overlap of the unwhitened decoder directions (nearest-neighbour |cos|, neuron "
        "alignment): the earlier figures, not the atomic inner product.",
    )
    atomic_geometry: AtomicGeometry | None = Field(
        None, description="Coherence under the atomic inner product and the uniqueness fraction."
    )
    supervised: SupervisedEval | None = Field(
        None, description="Against a supervised reference dictionary (when `supervised_prompts` > 0)."
    )
