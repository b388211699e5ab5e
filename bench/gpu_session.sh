#!/usr/bin/env bash
# One prepared GPU session (about 8 minutes): the CUDA test run, the CUDA benchmarks and the
# full preset of the rates, constants, shift and updates studies on the GPU. Logs, tables and
# figures go to $OUT (default ./gpu_out), packed as gpu_results.tgz. The tree is installed
# first, as a user installs it.
set -uo pipefail
out="${OUT:-gpu_out}"; mkdir -p "$out/logs"
source "$(dirname "$0")/install_tree.sh"
export PYTHONUNBUFFERED=1 HYPOTHESIS_PROFILE=drosim-noshrink
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/logs/gpu.txt"
timeout 120 python3 -P -m pytest -q -p no:cacheprovider tests/test_dro_duality.py \
  tests/test_dro_properties.py tests/test_dro_gradients.py tests/test_dro_inputs.py -k cuda \
  2>&1 | tail -25 | tee "$out/logs/pytest_cuda.txt"
timeout 120 python3 bench/bench_dro.py --device cuda --out-dir "$out" 2>&1 | tail -30 \
  | tee "$out/logs/bench_dro_cuda.txt"
timeout 80 python3 bench/bench_estimators.py --device cuda 2>&1 | tail -30 \
  | tee "$out/logs/bench_estimators_cuda.txt"
for study in rates:60 constants:40 shift:40 updates:30; do
  name="${study%%:*}"; limit="${study##*:}"
  start=$SECONDS
  timeout "$limit" python3 -P -m drosim.cli study "$name" --preset full --device cuda \
    --out "$out/figures" > "$out/logs/study_$name.txt" 2>&1
  echo "$name full preset on cuda: exit $?, $((SECONDS - start)) s" \
    | tee -a "$out/logs/studies_cuda.txt"
done
tar czf /tmp/gpu_results.tgz -C "$out" . && mv /tmp/gpu_results.tgz "$out/"
