#!/usr/bin/env bash
# The GPU checks, on a bare CUDA machine without network access: the CUDA tests (tests/**/test_*_gpu.py,
# among them the Triton kernels' of tasks/dictionary/kernels, compiled there with the machine's Triton),
# benchmarks/bench_gpu.py, benchmarks/bench_train.py --device cuda and, where present,
# benchmarks/bench_scale.py --device cuda --quick, and benchmarks/bench_writer.py (the shard writer on the
# machine's cores). Logs go to OUT_DIR (default $OUT, else ./gpu-checks).
#
#   bash benchmarks/gpu/fetch_wheels.sh          # once, on a machine with network: benchmarks/gpu/wheels/
#   bash benchmarks/gpu/run_checks.sh [OUT_DIR]  # on the GPU machine, from the repository root
#
# The machine is expected to hold torch (with Triton), numpy, PyYAML, safetensors, tqdm and pytest. What it
# lacks of the rest (pydantic and its helpers, polars) is installed from the carried wheels into a private
# folder, the wheel of pydantic-core matching its CPython picked by version; featureatlas itself is
# installed from the source tree into the same folder (no network: the build uses the setuptools already
# there). Without a GPU every step still runs: the CUDA tests skip, bench_gpu.py runs its small CPU sizes
# and the CUDA-only benchmarks are left out. Each step has a time limit; a failed step is reported and the
# next one runs; the exit status is that of the first failure. CHECKS picks the steps (default all:
# "tests gpu train scale", at most 4 + 4 + 3 + 3 minutes); on a machine lent for 10-minute commands, run
# CHECKS="tests gpu" and CHECKS="train scale" as two calls.
set -uo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
out="${1:-${OUT:-$root/gpu-checks}}"
mkdir -p "$out"
py="${PYTHON:-python3}"
status=0
summary="$out/summary.txt"
: >"$summary"
note() { echo "$*" | tee -a "$summary"; }

# ---- set-up: carried wheels for what does not import, featureatlas from the tree -----------------------
site="$(mktemp -d)/site"
mkdir -p "$site"
tag=$("$py" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
wheels=()
for spec in "pydantic:pydantic-*.whl" "pydantic_core:pydantic_core-*-$tag-*.whl" \
  "pydantic_settings:pydantic_settings-*.whl" "dotenv:python_dotenv-*.whl" \
  "annotated_types:annotated_types-*.whl" "typing_inspection:typing_inspection-*.whl" \
  "typing_extensions:typing_extensions-*.whl" "polars:polars-*.whl" \
  "sparsify:eai_sparsify-*.whl" "dictionary_learning.trainers.trainer:dictionary_learning-*.whl" \
  "natsort:natsort-*.whl" "simple_parsing:simple_parsing-*.whl" "docstring_parser:docstring_parser-*.whl" \
  "schedulefree:schedulefree-*.whl" "datasets:datasets-*.whl" "dill:dill-*.whl" \
  "multiprocess:multiprocess-*.whl"; do
  module="${spec%%:*}"
  pattern="${spec#*:}"
  if "$py" -c "import $module" 2>/dev/null; then
    continue
  fi
  found=(benchmarks/gpu/wheels/$pattern)
  if [ -e "${found[0]}" ]; then
    wheels+=("${found[0]}")
  else
    note "setup: $module does not import and no wheel benchmarks/gpu/wheels/$pattern is carried" \
      "(run benchmarks/gpu/fetch_wheels.sh, with PY_VERSIONS naming this machine's ${tag})"
    status=1
  fi
done
for wheel in "${wheels[@]}"; do  # one by one: a wheel for another CPython fails alone, visibly
  "$py" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheel" \
    || { note "setup: could not install $wheel (wrong CPython? see fetch_wheels.sh)"; status=1; }
done
export PYTHONPATH="$site:$root${PYTHONPATH:+:$PYTHONPATH}"
if ! "$py" -c "import featureatlas.tasks.dictionary" 2>/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$site" . \
    >"$out/install.log" 2>&1 || { note "setup: installing featureatlas failed (see install.log)"; status=1; }
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
{
  "$py" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")'
  "$py" -c 'import triton; print("triton", triton.__version__)' 2>&1 | tail -1
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
} >"$out/env.txt" 2>&1
cuda=$("$py" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
note "setup: $(head -1 "$out/env.txt")"

# ---- the steps ---------------------------------------------------------------------------------------------
step() {  # step NAME LIMIT_S LOG COMMAND...
  local name="$1" limit="$2" log="$3"
  shift 3
  local t0=$SECONDS
  timeout "$limit" "$@" >"$out/$log" 2>&1
  local rc=$?
  note "$name: exit $rc in $((SECONDS - t0)) s ($log): $(tail -1 "$out/$log" | cut -c1-300)"
  if [ $rc -ne 0 ] && [ $status -eq 0 ]; then status=$rc; fi
}

checks=" ${CHECKS:-tests gpu train scale} "
if [[ $checks == *" tests "* ]]; then
  mapfile -t gpu_tests < <(find tests -name 'test_*_gpu.py' | sort)
  step "cuda tests" 240 tests.log "$py" -m pytest -q -p no:cacheprovider -rs "${gpu_tests[@]}"
fi
if [[ $checks == *" gpu "* ]] && [ "$cuda" = 1 ]; then
  step "bench_gpu" 240 bench_gpu.log "$py" benchmarks/bench_gpu.py
elif [[ $checks == *" gpu "* ]]; then  # a CPU smoke run: one small size, two timed rounds
  step "bench_gpu" 300 bench_gpu.log "$py" benchmarks/bench_gpu.py --device cpu --d-sae 512 --steps 2
fi
if [ "$cuda" != 1 ]; then
  note "no CUDA: bench_train --device cuda and bench_scale --device cuda left out"
elif [[ $checks == *" train "* ]]; then
  step "bench_train" 180 bench_train.log "$py" benchmarks/bench_train.py --device cuda --d-in 2304 \
    --d-sae 16384 --k 64 --steps 5
fi
if [ "$cuda" = 1 ] && [[ $checks == *" scale "* ]] && [ -f benchmarks/bench_scale.py ]; then
  step "bench_scale" 120 bench_scale.log "$py" benchmarks/bench_scale.py --device cuda --quick
fi
if [[ $checks == *" scale "* ]]; then  # the shard writer on this machine's cores and disk, no GPU needed
  step "bench_writer" 60 bench_writer.log "$py" benchmarks/bench_writer.py --repeats 2
fi
note "status $status"
exit $status
