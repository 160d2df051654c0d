"""run_stage with a resumable build: a failure keeps `<id>.partial`, unregistered; the next run resumes."""

from __future__ import annotations

from pathlib import Path

import pytest

from featureatlas.schemas.artifacts import CorpusRef
from featureatlas.schemas.spec import CorpusSpec
from featureatlas.tasks.tracking.catalog import open_catalog
from featureatlas.tasks.tracking.identity import identity
from featureatlas.tasks.tracking.stage import StageContext, run_stage


def _run(ctx, ident, build, resumable=True):
    return run_stage(
        ctx, ident, CorpusRef, name="prepare_corpus", config={}, parents=[], build=build, resumable=resumable
    )


def test_resumable_stage_keeps_its_partial_folder_and_resumes(home):
    ctx = StageContext(settings=home)
    ident = identity("corpus", {"test": "resume"}, [])
    partial = home.artifacts_dir / "corpus" / f"{ident.id}.partial"
    seen: list[list[str]] = []

    def failing(folder: Path, _run) -> tuple[dict, dict]:
        (folder / "part-0").write_text("done")
        raise KeyboardInterrupt  # a Ctrl-C mid-build

    with pytest.raises(KeyboardInterrupt):
        _run(ctx, ident, failing)
    assert (partial / "part-0").read_text() == "done"
    assert open_catalog(home.catalog).find("corpus", ident.fingerprint) is None

    def finishing(folder: Path, _run) -> tuple[dict, dict]:
        assert folder == partial
        seen.append(sorted(p.name for p in folder.iterdir()))
        (folder / "part-1").write_text("done")
        return {"spec": CorpusSpec(), "n_documents": 1, "n_chars": 1}, {"n_documents": 1, "n_chars": 1}

    ref = _run(ctx, ident, finishing)
    assert seen == [["part-0"]]
    assert sorted(p.name for p in Path(ref.path).iterdir()) == ["part-0", "part-1"]
    assert sorted(p.name for p in (home.artifacts_dir / "corpus").iterdir()) == [
        ident.id
    ]  # no lock, no partial
    assert open_catalog(home.catalog).find("corpus", ident.fingerprint) is not None


def test_other_stages_still_clean_up(home):
    ctx = StageContext(settings=home)
    ident = identity("corpus", {"test": "plain"}, [])

    def failing(folder: Path, _run) -> tuple[dict, dict]:
        (folder / "part-0").write_text("done")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        _run(ctx, ident, failing, resumable=False)
    assert list((home.artifacts_dir / "corpus").iterdir()) == []
