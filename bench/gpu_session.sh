#!/usr/bin/env bash
# One prepared GPU session: the CUDA test run, the CUDA benchmarks and the full preset of the
# studies on the GPU, with logs and tables copied to $OUT (or ./gpu_out) as one archive.
set -uo pipefail
out="${OUT:-gpu_out}"; mkdir -p "$out/logs"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HYPOTHESIS_PROFILE=drosim-noshrink
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/logs/gpu.txt"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_dro_duality.py \
  tests/test_dro_properties.py tests/test_dro_gradients.py tests/test_dro_inputs.py -k cuda \
  2>&1 | tail -25 | tee "$out/logs/pytest_cuda.txt"
timeout 150 python3 bench/bench_dro.py --device cuda --out-dir "$out" 2>&1 | tail -30 \
  | tee "$out/logs/bench_dro_cuda.txt"
timeout 120 python3 bench/bench_estimators.py --device cuda 2>&1 | tail -30 \
  | tee "$out/logs/bench_estimators_cuda.txt"
for study in rates constants coverage shift updates; do
  /usr/bin/time -f "$study full preset on cuda: %e s" timeout 120 python3 -m drosim.cli study \
    "$study" --preset full --device cuda --out "$out/figures" 2>&1 | tail -3 \
    | tee -a "$out/logs/studies_cuda.txt"
done
tar czf "$out/gpu_results.tgz" -C "$out" logs figures $(cd "$out" && ls *.md *.csv 2>/dev/null)
