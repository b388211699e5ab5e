#!/usr/bin/env bash
# One prepared GPU session for issue 10 (about 8 minutes, every step under a timeout): the
# Emotion pipeline (sft -> train-reward -> train REBEL and chi2-REBEL -> report) with a
# randomly initialised model of GPT-2 small's shape (nothing can be downloaded there), timed
# stage by stage; and the generation rate of each rollout engine available (HF generate in
# float32 and under bf16 autocast; vLLM when installed). Logs and results go to $OUT.
#
# The GPU machine has no network: sft / train-reward need `datasets` and `accelerate`, LoRA
# needs `peft`. When the machine lacks them, carry a wheelhouse made here:
#   python -m pip download -q -d wheelhouse datasets accelerate peft
# (run with carry ["dist", "wheelhouse"]); it is installed offline before the steps.
set -uo pipefail
out="${OUT:-gpu_out}"; mkdir -p "$out/logs"
source "$(dirname "$0")/install_tree.sh"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if [ -d wheelhouse ]; then
  python3 -m pip install -q --no-index --find-links wheelhouse datasets accelerate peft \
    > "$out/logs/wheelhouse.txt" 2>&1 || tail -5 "$out/logs/wheelhouse.txt"
fi
export STEP_TAIL=30
source "$(dirname "$0")/session_steps.sh"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/logs/gpu.txt"
python3 -c "import importlib.util as u; print({m: bool(u.find_spec(m)) for m in
('datasets', 'accelerate', 'peft', 'vllm')})" | tee -a "$out/logs/gpu.txt"
step emotion_pipeline 330 python3 -P bench/emotion_pipeline.py --device cuda \
  --out "$out/emotion"
step generation_rate 120 python3 -P bench/bench_llm.py --device cuda --model gpt2-small \
  --pairs 64 --sections generation --repeats 3 --out-dir "$out"
step pytest_engines_cuda 60 python3 -P -m pytest -q -p no:cacheprovider \
  tests/test_llm_rollout_engines.py tests/test_llm_lora.py
rm -rf "$out/emotion/models" "$out/emotion/runs"/*/checkpoints
