#!/usr/bin/env bash
# Create .bench-venv: drosim (editable) plus TRL, for bench/bench_iteration.py only. TRL is
# never a dependency of drosim, so it lives in this separate environment.
#
#   bash bench/iteration_env.sh
#   OMP_NUM_THREADS=1 .bench-venv/bin/python bench/bench_iteration.py
#
# Versions: transformers is pinned to the one drosim's .venv uses, so both frameworks load the
# same model code; TRL 1.16 is the version issue 20 was measured against. Override with
# TRANSFORMERS_REQUIREMENT / TRL_REQUIREMENT / TORCH_REQUIREMENT (e.g. a CUDA torch wheel, plus
# "vllm" in EXTRA_REQUIREMENTS for the --vllm path).
set -euo pipefail
cd "$(dirname "$0")/.."
python_bin="${PYTHON:-python3.11}"
[ -x .bench-venv/bin/python ] || "$python_bin" -m venv .bench-venv
.bench-venv/bin/python -m pip install --quiet "${TORCH_REQUIREMENT:-torch==2.13.0}"
.bench-venv/bin/python -m pip install --quiet -e ".[llm]" \
  "${TRANSFORMERS_REQUIREMENT:-transformers==5.25.0}" "${TRL_REQUIREMENT:-trl==1.16.0}" \
  ${EXTRA_REQUIREMENTS:-}
.bench-venv/bin/python -c 'import torch, transformers, trl, drosim.llm; print("bench env ready: torch", torch.__version__, "transformers", transformers.__version__, "trl", trl.__version__)'
