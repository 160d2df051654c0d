"""The built wheel alone, installed into a fresh virtual environment outside the checkout, runs a pipeline.

The wheel is built from a copy of the source tree (so stale build folders of the checkout cannot leak into
it). The new environment gets featureatlas only from the wheel; its dependencies come from the site-packages
of the interpreter running the tests (a `.pth` file, appended after the environment's own site-packages, so
the wheel's copy wins over any editable install there). The pipeline runs from a folder that holds its own
`tasks.py` and `schemas.py`, which featureatlas must neither import nor clash with.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.flows.test_pipeline import tiny_spec

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
_SKIP = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".featureatlas", ".pytest_cache"
)


def _dependency_dirs() -> list[str]:
    """Every site-packages folder the running interpreter imports from (a worktree venv may chain another)."""
    dirs = [*site.getsitepackages(), *sys.path]
    out = []
    for d in dirs:
        p = Path(d)
        if p.name in ("site-packages", "dist-packages") and p.is_dir() and str(p) not in out:
            out.append(str(p))
    return out


def _clean_env(home: Path) -> dict[str, str]:
    """The test's environment without anything that points into the checkout or at the tests' services."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k != "PYTHONPATH" and not k.startswith(("PREFECT_", "MLFLOW_", "FEATUREATLAS_"))
    }
    return env | {"FEATUREATLAS_HOME": str(home), "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src") / "featureatlas"
    shutil.copytree(ROOT, src, ignore=_SKIP)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-q", "-w", str(out)],
        check=True,
        cwd=out,
    )
    (found,) = out.glob("featureatlas-*.whl")
    return found


def test_wheel_holds_one_namespace_and_its_data(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"featureatlas"}
    assert "featureatlas/flows/pipelines/demo.yaml" in names
    assert "featureatlas/schemas/migrations/env.py" in names
    assert any(n.startswith("featureatlas/schemas/migrations/versions/") and n.endswith(".py") for n in names)
    assert "featureatlas/tasks/dictionary/topk.py" in names


def test_wheel_in_fresh_venv_runs_a_pipeline_next_to_a_users_tasks_py(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    own_site = Path(
        subprocess.check_output([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
        .decode()
        .strip()
    )
    (own_site / "zz_dependencies.pth").write_text("\n".join(_dependency_dirs()) + "\n")
    env = _clean_env(tmp_path / "home")
    subprocess.run(
        [py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True, env=env
    )

    # a research folder with its own tasks.py and schemas.py: importing either would fail loudly
    work = tmp_path / "research"
    work.mkdir()
    for name in ("tasks.py", "schemas.py"):
        (work / name).write_text(f"raise ImportError('the user\\'s own {name} was imported')\n")

    probe = (
        "import importlib.util as u, json, featureatlas, featureatlas.tasks.dictionary as d;"
        "print(json.dumps({'file': featureatlas.__file__, 'flows': u.find_spec('flows') is not None,"
        "'methods': sorted(d.METHODS), 'api': featureatlas.__all__}))"
    )
    found = json.loads(subprocess.check_output([py, "-c", probe], cwd=tmp_path, env=env))
    assert Path(found["file"]).is_relative_to(own_site), found["file"]
    assert not found["flows"] and "topk" in found["methods"]
    assert {"run", "catalog", "load_dictionary", "features"} <= set(found["api"])
    for name in ("tasks", "schemas", "flows"):
        done = subprocess.run([py, "-c", f"import {name}"], cwd=tmp_path, env=env, capture_output=True)
        assert done.returncode != 0 and b"ModuleNotFoundError" in done.stderr, name

    spec = tiny_spec(tmp_path, label={"top_k": 3, "window": 2, "embedding_score": False, "atlas": False})
    spec["evaluate"] = {"max_tokens": 512, "ce_contexts": 4, "ablation_latents": 1, "steering_latents": 1}
    (work / "spec.yaml").write_text(yaml.safe_dump(spec))
    done = subprocess.run(
        [env_dir / "bin" / "featureatlas", "run", "spec.yaml", "--json"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    (d,) = result["dictionaries"]
    assert d["dictionary"]["config"]["method"] == "topk" and d["evaluation"]["l0"] <= 4 + 1e-6
    assert Path(d["dictionary"]["path"], "weights.safetensors").is_file()
    # the catalog was migrated from the wheel's Alembic scripts
    assert (tmp_path / "home" / "catalog.db").is_file()
