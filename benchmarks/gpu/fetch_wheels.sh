#!/usr/bin/env bash
# Download, here (with network), the wheels a bare CUDA machine lacks for the GPU checks: the pydantic stack
# the configs and the test set-up need, and polars (the activation store imports it at module level; the GPU
# checks never call it, so polars 1.9, a 33 MB wheel, stands in for the 55 MB of 2.x). torch, Triton, numpy,
# PyYAML, safetensors, tqdm and pytest are expected there. The wheels land in benchmarks/gpu/wheels/ (ignored
# by git); pydantic-core is compiled per CPython, so it is fetched for each version in PY_VERSIONS (default
# 3.12, the GPU image's; each more costs 2.3 MB). The peers bench_gpu.py compares against (sparsify,
# dictionary_learning) come too, with what they import that the image lacks. Everything stays under ~40 MB.
#
#   bash benchmarks/gpu/fetch_wheels.sh                  # then carry benchmarks/gpu/wheels to the machine
#   PY_VERSIONS="3.11 3.12" bash benchmarks/gpu/fetch_wheels.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="$here/wheels"
python="${PYTHON:-python3}"
# The versions this repository is tested with; the pure-Python ones fit every CPython.
pure=(pydantic==2.14.4 pydantic-settings==2.16.3 python-dotenv==1.2.4 annotated-types==0.8.0
      typing-inspection==0.4.5 typing-extensions==4.16.0)
mkdir -p "$out"
platforms=(--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64)
common=(download --quiet --no-deps --only-binary=:all: --implementation cp "${platforms[@]}" -d "$out")
# the `peers` extra, pure Python; sparsify's package imports its trainer, hence datasets and the rest
peers=(eai-sparsify==1.3.3 dictionary-learning==0.1.0 natsort==8.4.0 simple-parsing==0.1.9
       docstring-parser==0.18.0 schedulefree==1.4.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19)
"$python" -m pip "${common[@]}" --python-version 3.12 "${pure[@]}" "${peers[@]}" polars==1.9.0
for v in ${PY_VERSIONS:-3.12}; do
  "$python" -m pip "${common[@]}" --python-version "$v" pydantic-core==2.50.5
done
du -sh "$out"
