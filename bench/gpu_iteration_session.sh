#!/usr/bin/env bash
# One prepared GPU session for the online iteration (issue 20), at most TOTAL_S seconds
# (default 540: one 10-minute command of a lent H100 / H200, with room to spare), every step
# under a timeout that also respects what is left of that total. In order of priority:
#   b) the update step of a model of Llama-3.2-1B's shape (bf16 autocast, gradient
#      checkpointing, 64 pairs x 512 tokens) with packed rows where bench_llm.py has
#      --packing: seconds, tokens/s and MFU on real tokens, W-REBEL and chi2-REBEL over REBEL;
#   c) bench/bench_iteration.py --device cuda: one online iteration, drosim against TRL's
#      GRPO / RLOO where TRL is importable (else drosim alone), with vLLM rollouts too where
#      vLLM is importable;
#   a) bench/vllm_equivalence.py: the vLLM engine against the HF engine on a tiny random
#      Llama, weights synced every iteration. vLLM is installed into its own venv
#      (/tmp/vllm-venv, over the system packages, so its torch pin cannot touch the other
#      steps) from a wheel in wheels/ or dist/, else from the index; where neither is
#      reachable the step is skipped with a message (the machine is usually offline);
#   b') the same 1B benchmark on padded rows, the baseline of b), if time is left.
# Results and logs go to $OUT (default ./gpu_out): $OUT/logs/<step>.txt, $OUT/logs/steps.txt
# (exit status and seconds of each step) and each benchmark's own tables. The tree is
# installed first, as a user installs it.
#
#   bash bench/gpu_iteration_session.sh             # on the GPU machine
#   bash bench/gpu_iteration_session.sh --dry-run   # anywhere: parses, and every script and
#                                                   # option it names exists (DRY_RUN=1 too)
set -uo pipefail
here="$(dirname "$0")"
dry="${DRY_RUN:-0}"
[ "${1:-}" = "--dry-run" ] && dry=1
total="${TOTAL_S:-540}"
py="${PYTHON:-python3}"  # the interpreter with torch (and drosim, once installed)
out="${OUT:-gpu_out}"
[ "$dry" = 1 ] && out="$(mktemp -d)"
mkdir -p "$out/logs"
source "$here/session_steps.sh"
problems=0

# The options a script's --help lists (argparse prints each as --name).
has_option() {
  grep -qE -- "(^|[^-[:alnum:]])$2([^-[:alnum:]]|$)" <<< "$1"
}

# Dry run: the command's script exists and its --help lists every --option given to it.
check() {
  local name=$1 script="" arg help
  shift 2
  for arg in "$@"; do
    case "$arg" in *.py) script=$arg; break ;; esac
  done
  if [ -z "$script" ]; then
    echo "dry-run: $name: no script to check in: $*"
    return
  fi
  if [ ! -f "$script" ]; then
    echo "dry-run: $name: MISSING $script"; problems=$((problems + 1)); return
  fi
  if ! help=$("$py" "$script" --help 2>&1); then
    echo "dry-run: $name: $script --help failed: $(tail -1 <<< "$help")"
    problems=$((problems + 1)); return
  fi
  for arg in "$@"; do
    case "$arg" in
      --*) has_option "$help" "${arg%%=*}" || {
             echo "dry-run: $name: $script has no option $arg"; problems=$((problems + 1)); } ;;
    esac
  done
  echo "dry-run: $name: ok ($*)"
}

# step NAME SECONDS COMMAND... under at most what is left of the session's total.
run() {
  local name=$1 limit=$2 left=$((total - SECONDS))
  if [ "$dry" = 1 ]; then check "$@"; return; fi
  if [ "$left" -lt 30 ]; then
    echo "$name: skipped, ${left} s left of ${total}" | tee -a "$out/logs/steps.txt"; return
  fi
  shift 2
  step "$name" "$((limit < left ? limit : left))" "$@"
}

if [ "$dry" = 1 ]; then
  bash -n "$0" && echo "dry-run: $0 parses" || problems=$((problems + 1))
  for file in "$here/install_tree.sh" "$here/session_steps.sh"; do
    [ -f "$file" ] || { echo "dry-run: MISSING $file"; problems=$((problems + 1)); }
  done
else
  source "$here/install_tree.sh"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/logs/gpu.txt"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

# b) the packed 1B-shape update step (--packing only where bench_llm.py has it)
packing=() rows=padded
if "$py" "$here/bench_llm.py" --help 2>/dev/null | grep -q -- "--packing"; then
  packing=(--packing) rows=packed
else
  echo "note: bench/bench_llm.py has no --packing option: the 1B step runs on padded rows"
fi
llama=("$py" "$here/bench_llm.py" --device cuda --bf16 --model llama-1b --pairs 64
       --seq-len 512 --sections steps --repeats 3 --methods chi2-rebel,w-rebel)
run "bench_llama_1b_$rows" 200 "${llama[@]}" "${packing[@]}" --out-dir "$out/llama_1b_$rows"

# c) one online iteration against TRL (drosim alone where TRL is not importable)
frameworks=rebel,chi2-rebel,grpo,rloo
"$py" -c "import trl" 2>/dev/null || {
  frameworks=rebel,chi2-rebel; echo "note: TRL is not importable: bench_iteration runs drosim alone"; }
iteration=("$py" "$here/bench_iteration.py" --device cuda --frameworks "$frameworks"
           --out-dir "$out")
if [ -f "$here/bench_iteration.py" ] || [ "$dry" = 1 ]; then
  run bench_iteration 150 "${iteration[@]}"
  "$py" -c "import vllm" 2>/dev/null && run bench_iteration_vllm 150 "${iteration[@]}" --vllm
else
  echo "note: bench/bench_iteration.py is not there: step c) skipped"
fi

# a) vLLM against HF sampling: vLLM from a carried wheel or the index, into its own venv
vpy=$py
if [ "$dry" = 0 ] && [ $((total - SECONDS)) -ge 90 ] && ! "$py" -c "import vllm" 2>/dev/null
then
  wheel=$(ls wheels/vllm-*.whl dist/vllm-*.whl 2>/dev/null | tail -1)
  "$py" -m venv --system-site-packages /tmp/vllm-venv \
    && timeout "$(( total - SECONDS - 60 > 150 ? 150 : total - SECONDS - 60 ))" \
      /tmp/vllm-venv/bin/python -m pip install -q --timeout 10 --retries 0 \
      ${wheel:+--find-links "$(dirname "$wheel")"} "${wheel:-vllm}" \
      > "$out/logs/vllm_install.txt" 2>&1 \
    && vpy=/tmp/vllm-venv/bin/python \
    || echo "vllm: not installable here (no wheel in wheels/ or dist/, no index reachable):" \
            "the equivalence step will say so; see $out/logs/vllm_install.txt" \
            | tee -a "$out/logs/steps.txt"
fi
run vllm_equivalence 150 "$vpy" "$here/vllm_equivalence.py" --out "$out/vllm_equivalence_cuda.md"

# b') the padded baseline of b), if there was a packed run and time is left
if [ ${#packing[@]} -gt 0 ]; then
  run bench_llama_1b_padded 200 "${llama[@]}" --out-dir "$out/llama_1b_padded"
fi

if [ "$dry" = 1 ]; then
  rm -rf "$out"
  echo "dry-run: $problems problem(s)"
  exit $(( problems > 0 ))
fi
echo "session: $SECONDS s of ${total}" | tee -a "$out/logs/steps.txt"
