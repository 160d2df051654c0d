"""docs/notebook.ipynb runs in a real Jupyter kernel on a tiny spec; it is stored without outputs."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest
import yaml

from tests.flows.test_pipeline import tiny_spec

NOTEBOOK = Path(__file__).resolve().parents[2] / "docs" / "notebook.ipynb"


def test_notebook_is_stored_without_outputs():
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.slow
def test_notebook_runs_on_a_tiny_spec(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    spec = tiny_spec(tmp_path, dictionaries=[{"method": "topk", "d_sae": 64, "k": 4, "batch_size": 256}])
    spec["evaluate"] = {"max_tokens": 512, "ce_contexts": 4, "ablation_latents": 1, "steering_latents": 1}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    # the kernel inherits this environment: its own home, none of the test session's services
    for key in [k for k in os.environ if k.startswith(("PREFECT_", "MLFLOW_", "FEATUREATLAS_"))]:
        monkeypatch.delenv(key)
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend returns PNGs
    monkeypatch.setenv("FEATUREATLAS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FEATUREATLAS_NOTEBOOK_SPEC", str(tmp_path / "spec.yaml"))

    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
    ).execute()

    text = "\n".join(
        o.get("text", "") + str(o.get("data", {}).get("text/plain", ""))
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
    )
    assert "FVU" in text and "CE-loss score" in text and "topk" in text
    assert "made from: {'cache-" in text and "atlas/features/" in text
    pngs = [
        o.data["image/png"]
        for c in nb.cells
        for o in c.get("outputs", [])
        if "image/png" in o.get("data", {})
    ]
    assert len(pngs) == 1 and base64.b64decode(pngs[0]).startswith(b"\x89PNG")
    assert (tmp_path / "home" / "catalog.db").is_file()
