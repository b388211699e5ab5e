#!/usr/bin/env bash
# Create .venv and install drosim in it, editable, with the extras named (default: test,llm).
#
#   bash scripts/setup.sh            # drosim[test,llm]
#   bash scripts/setup.sh llm        # drosim[llm]: training only
#
# TORCH_REQUIREMENT overrides the torch requirement installed first, e.g.
# TORCH_REQUIREMENT="torch==2.13.0" for a CPU wheel already on disk (CI does this). Left
# unset, an existing torch in .venv is kept and otherwise pip's usual torch is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test,llm}"
python_bin="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python_bin" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "${TORCH_REQUIREMENT:-torch}"
.venv/bin/python -m pip install --quiet -e ".[${extras}]"
echo "drosim installed in .venv (extras: ${extras}; $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
