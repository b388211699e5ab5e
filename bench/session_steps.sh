# Sourced by the GPU session scripts after $out/logs exists:
#   step NAME SECONDS COMMAND...  runs one part under a timeout, logs it to $out/logs/NAME.txt,
#   and reports its exit status and time (in $out/logs/steps.txt and on stdout).
step() {
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$out/logs/$name.txt" 2>&1
  echo "$name: exit $?, $((SECONDS - start)) s" | tee -a "$out/logs/steps.txt"
  tail -"${STEP_TAIL:-40}" "$out/logs/$name.txt"
}
