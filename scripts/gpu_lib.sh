# Shared by the scripts/gpu_*.sh runners; sourced, not run on its own.
#   gpu_setup NAME   cd to the repository root, export the run environment, make $OUT/NAME and set DIR to it
#                    ($OUT: the device machine's return folder, or /tmp/moba-gpu when run elsewhere).
#   step NAME LIMIT CMD...
#                    run CMD under `timeout LIMIT` with its output in $DIR/NAME.log, then print its exit
#                    status and seconds, and the log lines matching $STEP_GREP (else its last $TAILN lines).
#   pack             $OUT/NAME.tgz of $DIR: the device returns at most 8 files, so one archive holds them all.
gpu_setup() {
  cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
  export PYTHONPATH=. PYTHONUNBUFFERED=1 COLUMNS=150
  OUT=${OUT:-/tmp/moba-gpu}
  GPU_RUN=$1
  DIR="$OUT/$GPU_RUN"
  mkdir -p "$DIR"
}

step() {
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  timeout "$limit" "$@" >"$DIR/$name.log" 2>&1
  rc=$?
  echo "== $name: rc=$rc in $((SECONDS - t0)) s"
  if [ -n "${STEP_GREP:-}" ]; then
    grep -E "$STEP_GREP" "$DIR/$name.log" | tail -n "${TAILN:-12}" | cut -c1-300
  else
    tail -n "${TAILN:-6}" "$DIR/$name.log" | cut -c1-300
  fi
}

pack() {
  tar czf "$OUT/$GPU_RUN.tgz" -C "$OUT" "$GPU_RUN"
}
