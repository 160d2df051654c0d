"""A dictionary is refused on a model, hookpoint or width it was not trained on, with both sides named."""

from __future__ import annotations

import pytest

from featureatlas.schemas.artifacts import ActivationCacheRef, DictionaryRef, ModelRef
from featureatlas.tasks.evaluate.compatibility import check_dictionary_fits


def cache_ref(model_id: str = "mdl-aaa", d_in: int = 32) -> ActivationCacheRef:
    # model_construct: only the fields the check reads; the rest of a real ref is beside the point here.
    model = ModelRef.model_construct(id=model_id, source=f"/models/{model_id}")
    return ActivationCacheRef.model_construct(
        id="act-bbb", model=model, hookpoints=["model.layers.0", "model.layers.1"],
        d_in={"model.layers.0": d_in, "model.layers.1": d_in},
    )  # fmt: skip


def dictionary_ref(hookpoint: str = "model.layers.1", d_in: int = 32) -> DictionaryRef:
    return DictionaryRef.model_construct(
        id="dict-ccc", cache_id="act-bbb", hookpoint=hookpoint, d_in=d_in, d_sae=64
    )


def test_matching_dictionary_passes():
    check_dictionary_fits(dictionary_ref(), cache_ref(), "model.layers.1", "mdl-aaa")
    check_dictionary_fits(dictionary_ref(), cache_ref(), "model.layers.1", None)  # cache not catalogued


def test_other_model_is_refused_with_both_names_unless_forced():
    with pytest.raises(ValueError, match=r"trained on model mdl-aaa.*evaluated on model mdl-zzz.*force"):
        check_dictionary_fits(dictionary_ref(), cache_ref("mdl-zzz"), "model.layers.1", "mdl-aaa")
    check_dictionary_fits(dictionary_ref(), cache_ref("mdl-zzz"), "model.layers.1", "mdl-aaa", force=True)


def test_other_hookpoint_is_refused_with_both_names_unless_forced():
    with pytest.raises(ValueError, match=r"'model.layers.1' but is being evaluated at 'model.layers.0'"):
        check_dictionary_fits(dictionary_ref(), cache_ref(), "model.layers.0", "mdl-aaa")
    check_dictionary_fits(dictionary_ref(), cache_ref(), "model.layers.0", "mdl-aaa", force=True)
    with pytest.raises(ValueError, match=r"'model.layers.7' is not in cache act-bbb"):
        check_dictionary_fits(dictionary_ref(), cache_ref(), "model.layers.7", "mdl-aaa", force=True)


def test_width_mismatch_names_both_shapes_even_when_forced():
    with pytest.raises(ValueError, match=r"d_in 32 \(W_enc \[32, 64\]\).*\[n, 48\]"):
        check_dictionary_fits(dictionary_ref(), cache_ref(d_in=48), "model.layers.1", "mdl-aaa", force=True)
