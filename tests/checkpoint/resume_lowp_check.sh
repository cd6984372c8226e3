#!/usr/bin/env bash
# Checkpoint and resume of train_example under --precision fp16 (GradScaler state and FusedSGD
# momentum in the checkpoint) or bf16:
#   resume_lowp_check.sh PRECISION TRAIN_EXAMPLE DATA_DIR NP MPIRUN [MPIRUN ARGS...]
# A run stopped at step 5 (a checkpoint at step 3) and resumed ends with parameters bit-identical to an uninterrupted run,
# and resuming with another --precision is refused. DEVICE (environment, default cpu) selects the device.
set -euo pipefail
precision=$1 exe=$2 data=$3 np=$4
shift 4
mpirun=("$@")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
args=(--device "${DEVICE:-cpu}" --epochs 2 --limit-train 512 --limit-test 200 --batch 128 --progress-every 0
      --data "$data" --deterministic)
run() { "${mpirun[@]}" -np "$np" "$exe" "${args[@]}" "$@"; }
fail() {
  echo "FAIL: $*"
  for f in "$work"/*.out; do echo "== $f"; cat "$f"; done
  exit 1
}
final_hash() { grep -o 'identical on all [0-9]* rank(s) (hash [0-9a-f]*)' "$1" | grep -o 'hash [0-9a-f]*'; }

run --precision "$precision" > "$work/full.out" 2>&1 || fail "uninterrupted run"
full=$(final_hash "$work/full.out") || fail "no hash in the uninterrupted run"
run --precision "$precision" --checkpoint-dir "$work/ck" --checkpoint-every-steps 3 --stop-after-steps 5 > "$work/first.out" 2>&1 ||
  fail "stopped run"
run --precision "$precision" --checkpoint-dir "$work/ck" --resume > "$work/resumed.out" 2>&1 || fail "resumed run"
grep -q "resumed from .* at step 3" "$work/resumed.out" || fail "did not resume at step 3"
resumed=$(final_hash "$work/resumed.out") || fail "no hash in the resumed run"
[ "$full" = "$resumed" ] || fail "resumed run ends with $resumed, uninterrupted with $full"
other=fp32
[ "$precision" = fp32 ] && other=bf16
if run --precision "$other" --checkpoint-dir "$work/ck" --resume > "$work/other.out" 2>&1; then
  fail "resuming a $precision checkpoint with --precision $other was accepted"
fi
grep -q "precision = $precision, this run has precision = $other" "$work/other.out" || fail "no precision mismatch message"
echo "PASS: $precision resume bit-identical ($full), other precision refused"
