"""Secrets never reach MLflow params, tags, logs or the catalog; names cannot escape their folder; nothing
in the code base loads with pickle."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from featureatlas.schemas.artifacts import CorpusRef
from featureatlas.schemas.spec import CorpusSpec
from featureatlas.tasks.common.shards import CacheIntegrityError, check_shard_size
from featureatlas.tasks.tracking.catalog import open_catalog
from featureatlas.tasks.tracking.identity import Identity, identity
from featureatlas.tasks.tracking.paths import check_name, inside
from featureatlas.tasks.tracking.secrets import install_log_masking, mask_secrets, mask_text, mask_url
from featureatlas.tasks.tracking.stage import StageContext, run_stage, tracker_for

REPO = Path(__file__).resolve().parents[2]
TOKEN = "hf_QwErTyUiOpAsDfGhJkLzXcVb"
KEY = "sk-proj-0123456789abcdefABCDEF"


def test_masking_rules(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    assert mask_url("postgresql+psycopg://lab:pa:ss@db:5432/x") == "postgresql+psycopg://lab:***@db:5432/x"
    assert mask_url("https://u:tok@example.org/a") == "https://u:***@example.org/a"
    assert mask_url("sqlite:////tmp/a.db") == "sqlite:////tmp/a.db"  # nothing to hide
    assert mask_text(f"calling with {KEY} now") == "calling with *** now"
    llm = {"api_key": "abc", "api_key_env": "OPENAI_API_KEY"}
    masked = mask_secrets({"hf_token": TOKEN, "max_tokens": 5, "exclude_first_token": True, "llm": llm})
    assert masked == {"hf_token": "***", "max_tokens": 5, "exclude_first_token": True,
                      "llm": {"api_key": "***", "api_key_env": "OPENAI_API_KEY"}}  # fmt: skip


def test_secrets_stay_out_of_params_tags_logs_and_catalog(home, monkeypatch, caplog):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    install_log_masking()
    ctx = StageContext(settings=home)
    db = "postgresql+psycopg://lab:db-Pass-93@db.lab/corpus"
    config = {"hf_token": TOKEN, "source": db, "note": f"token {TOKEN}", "k": 4}
    ident = identity("corpus", config, [])

    def build(folder: Path, run) -> tuple[dict, dict]:
        (folder / "x").write_text("x")
        logging.getLogger("tasks.test").warning("loading %s with %s", db, TOKEN)
        run.set_tags({"featureatlas.source": db})
        spec = CorpusSpec(sources=[db])
        return {"spec": spec, "n_documents": 1, "n_chars": 1}, {"n_documents": 1, "n_chars": 1}

    with caplog.at_level(logging.INFO):
        ref = run_stage(ctx, ident, CorpusRef, name="prepare_corpus", config=config, parents=[], build=build)

    run = MlflowClient(home.mlflow_uri).get_run(ref.mlflow_run_id)
    assert run.data.params == {"hf_token": "***", "source": "postgresql+psycopg://lab:***@db.lab/corpus",
                               "note": "token ***", "k": "4"}  # fmt: skip
    assert run.data.tags["featureatlas.source"] == "postgresql+psycopg://lab:***@db.lab/corpus"
    _, row = open_catalog(home.catalog).get(ref.id)
    stored = str(row.config) + str(row.ref)
    logs = caplog.text
    assert "loading postgresql+psycopg://lab:***@db.lab/corpus with ***" in logs
    for secret in (TOKEN, "db-Pass-93"):
        assert secret not in stored and secret not in logs and secret not in str(run.data)


def test_names_cannot_escape_their_folder(tmp_path, home):
    root = tmp_path / "root"
    root.mkdir()
    assert inside(root, "acts", "00000.safetensors") == root / "acts" / "00000.safetensors"
    for bad in ("../x", "a/../../x", "/etc/passwd", "..", "a\\..\\..\\x", "C:/x"):
        with pytest.raises(ValueError, match="would leave its folder"):
            check_name(bad)
    (root / "link").symlink_to(tmp_path)
    with pytest.raises(ValueError, match="outside"):
        inside(root, "link", "escaped")

    (tmp_path / "secret.safetensors").write_bytes(b"0" * 8)
    with pytest.raises(CacheIntegrityError, match="would leave its folder"):
        check_shard_size(root, "model.layers.0", {"file": "../secret.safetensors", "bytes": 8})

    ctx = StageContext(settings=home)
    evil = Identity("corpus", "../../../evil", "f" * 64)
    with pytest.raises(ValueError, match="would leave its folder"):
        run_stage(ctx, evil, CorpusRef, name="prepare_corpus", config={}, parents=[],
                  build=lambda _folder, _run: ({}, {}))  # fmt: skip
    assert not (home.home_dir.parent / "evil").exists()

    tracker = tracker_for(home)
    f = tmp_path / "f.txt"
    f.write_text("x")
    with tracker.run("escape") as run, pytest.raises(ValueError, match="would leave its folder"):
        run.log_artifact(f, "../../outside")


def _unsafe_loads(path: Path) -> list[str]:
    """Calls that can execute code from a file: pickle and friends, torch.load without weights_only=True."""
    found = []
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            for n in names:
                if n and n.split(".")[0] in {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve",
                                             "marshal"}:  # fmt: skip
                    found.append(f"{path}:{node.lineno}: imports {n}")
        if isinstance(node, ast.Call):
            func = ast.unparse(node.func)
            kwargs = {k.arg: ast.unparse(k.value) for k in node.keywords}
            torch_load = func.endswith("torch.load") or (func == "load" and "weights_only" in kwargs)
            if torch_load and kwargs.get("weights_only") != "True":
                found.append(f"{path}:{node.lineno}: {func} without weights_only=True")
            if func.endswith(("np.load", "numpy.load")) and kwargs.get("allow_pickle") == "True":
                found.append(f"{path}:{node.lineno}: {func}(allow_pickle=True)")
            if func.endswith("read_pickle"):
                found.append(f"{path}:{node.lineno}: {func}")
    return found


def test_nothing_is_loaded_with_pickle(tmp_path):
    files = [p for d in ("schemas", "tasks", "flows") for p in (REPO / d).rglob("*.py")]
    assert len(files) > 40
    assert [hit for f in files for hit in _unsafe_loads(f)] == []
    # the checker itself catches what it looks for
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import pickle\nimport torch\nimport numpy as np\nx = torch.load('a.pt')\n"
        "y = torch.load('b', weights_only=False)\nz = np.load('c', allow_pickle=True)\n"
        "ok = torch.load('d', weights_only=True)\n"
    )
    assert len(_unsafe_loads(bad)) == 4
