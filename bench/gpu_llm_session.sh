#!/usr/bin/env bash
# One prepared GPU session for drosim.llm (about 6 minutes): the CUDA tests of the transformer
# updates, the LLM benchmark on a GPT-2-small-sized model in bf16, and a short bf16 +
# gradient-checkpointing training run through the command line. Logs go to $OUT (default
# ./gpu_out). The tree is installed first, as a user installs it.
set -uo pipefail
out="${OUT:-gpu_out}"; mkdir -p "$out/logs"
source "$(dirname "$0")/install_tree.sh"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/logs/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers',
transformers.__version__)" | tee -a "$out/logs/gpu.txt"
timeout 90 python3 -P -m pytest -q -p no:cacheprovider tests/test_llm_gpu.py 2>&1 | tail -15 \
  | tee "$out/logs/pytest_llm_cuda.txt"
timeout 300 python3 bench/bench_llm.py --device cuda --model gpt2-small --bf16 \
  --out-dir "$out" 2>&1 | tail -90 | tee "$out/logs/bench_llm_cuda.txt"
start=$SECONDS
timeout 90 python3 -P -m drosim.llm.cli train --config smoke device=cuda bf16=true \
  gradient_checkpointing=true method=w-rebel iterations=4 "out_dir=$out/train_smoke" \
  > "$out/logs/train_smoke.txt" 2>&1
echo "bf16 + checkpointing W-REBEL smoke run on cuda: exit $?, $((SECONDS - start)) s" \
  | tee -a "$out/logs/train_smoke.txt"
rm -rf "$out/train_smoke/final" "$out/train_smoke/checkpoints" "$out/train_smoke/base"
