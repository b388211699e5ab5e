#!/usr/bin/env bash
# One prepared GPU session for drosim.llm (about 7 minutes, every step under a timeout): the
# CUDA tests of the transformer updates; the update step of a model of Llama-3.2-1B's shape
# (bf16 autocast, gradient checkpointing, 64 pairs x 512 tokens) with its MFU and every
# robust method's time and memory over the plain one; GPT-2 small at 128 pairs for the
# README's earlier table; the REBEL policy term at theta = theta_t under bf16; and a short
# FSDP2 + bf16 + W-REBEL training run through torchrun. Logs go to $OUT (default ./gpu_out).
# The tree is installed first, as a user installs it.
set -uo pipefail
out="${OUT:-gpu_out}"; mkdir -p "$out/logs"
source "$(dirname "$0")/install_tree.sh"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
source "$(dirname "$0")/session_steps.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/logs/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers',
transformers.__version__)" | tee -a "$out/logs/gpu.txt"
step pytest_llm_cuda 130 python3 -P -m pytest -q -p no:cacheprovider tests/test_llm_gpu.py \
  tests/test_llm_fast_update.py tests/test_llm_logprobs.py
step bench_llama_1b 220 python3 bench/bench_llm.py --device cuda --bf16 --model llama-1b \
  --pairs 64 --seq-len 512 --sections steps,memory --repeats 3 \
  --methods chi2-rebel,kl-rebel,kltemp-rebel,w-rebel,wdpo --out-dir "$out"
step bench_gpt2_small 90 python3 bench/bench_llm.py --device cuda --bf16 --model gpt2-small \
  --pairs 128 --sections steps --repeats 5 --methods chi2-rebel,kl-rebel,w-rebel,wdpo \
  --out-dir "$out"
step pi_t_residual 60 python3 bench/pi_t_residual.py --device cuda --bf16 --model gpt2-small
# PYTHONSAFEPATH (as -P) keeps the source tree off sys.path in torchrun's children too
step fsdp2_train 80 env PYTHONSAFEPATH=1 python3 -m torch.distributed.run --standalone --nproc-per-node 1 \
  -m drosim.llm.cli train --config smoke device=cuda bf16=true sharding=fsdp2 \
  method=w-rebel iterations=2 "out_dir=$out/fsdp2_run"
rm -rf "$out/fsdp2_run"
