#!/usr/bin/env bash
# Checkpoint and resume of train_example, end to end:
#   resume_check.sh MODE TRAIN_EXAMPLE DATA_DIR NP MPIRUN [MPIRUN ARGS...]
# MODE
#   stop           stop at step 7 (checkpoints every 3 steps), resume: the losses of every step and
#                  the final parameters equal an uninterrupted run's, bit for bit
#   kill-data      the second save is killed (SIGKILL) after writing data / before its manifest /
#   kill-manifest  before its rename: the job dies, the first checkpoint (step 3) stays valid, and
#   kill-rename    the resumed run still ends bit-identical to the uninterrupted one
#   resize         stop at step 7 on NP ranks, resume on one rank: it continues (with a warning)
# DEVICE (environment, default cpu) selects the device of the runs.
set -euo pipefail
mode=$1 exe=$2 data=$3 np=$4
shift 4
mpirun=("$@")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
args=(--device "${DEVICE:-cpu}" --epochs 2 --limit-train 512 --limit-test 500 --batch 64 --progress-every 0
      --data "$data" --deterministic)
run() {
  local n=$1
  shift
  "${mpirun[@]}" -np "$n" "$exe" "${args[@]}" "$@"
}
fail() {
  echo "FAIL: $*"
  for f in "$work"/*.out; do echo "== $f"; cat "$f"; done
  exit 1
}
final_hash() { grep -o 'identical on all [0-9]* rank(s) (hash [0-9a-f]*)' "$1" | grep -o 'hash [0-9a-f]*'; }

run "$np" --log-losses "$work/full.txt" > "$work/full.out" 2>&1 || fail "uninterrupted run"
full_hash=$(final_hash "$work/full.out") || fail "no hash in the uninterrupted run"
[ "$(wc -l < "$work/full.txt")" -eq 16 ] || fail "expected 16 logged steps"

ck=(--checkpoint-dir "$work/ck" --checkpoint-every-steps 3 --log-losses "$work/part.txt")
expect_resume_step=6
case "$mode" in
  stop|resize)
    run "$np" "${ck[@]}" --stop-after-steps 7 > "$work/first.out" 2>&1 || fail "stopped run"
    grep -q "stopped after step 7" "$work/first.out" || fail "the first run did not stop at step 7"
    ;;
  kill-data|kill-manifest|kill-rename)
    point=${mode#kill-}
    if DSTRAIN_CHECKPOINT_FAULT="$point:2" run "$np" "${ck[@]}" > "$work/first.out" 2>&1; then
      fail "the run with a kill at '$point' of its second save did not die"
    fi
    [ -d "$work/ck/step-000000000003" ] || fail "checkpoint of step 3 missing after the kill"
    [ ! -d "$work/ck/step-000000000006" ] || fail "the killed save of step 6 was renamed into place"
    expect_resume_step=3
    ;;
  *) echo "unknown mode $mode"; exit 2 ;;
esac

resume_np=$np
[ "$mode" = resize ] && resume_np=1
run "$resume_np" "${ck[@]}" --resume > "$work/resume.out" 2>&1 || fail "resumed run"
grep -q "resumed from .* at step $expect_resume_step " "$work/resume.out" || fail "did not resume at step $expect_resume_step"
if [ "$mode" = resize ]; then
  grep -q "written by $np ranks, resuming on 1" "$work/resume.out" || fail "no warning about the world size"
  grep -q "train_example device=" "$work/resume.out" || fail "the resized run did not finish"
  echo "PASS: resize from $np ranks to 1"
  exit 0
fi
resume_hash=$(final_hash "$work/resume.out") || fail "no hash in the resumed run"

# Every logged loss of the interrupted runs equals the uninterrupted run's at the same step (a step
# logged twice must agree), and together they cover every step from the resume point on.
sort -u "$work/part.txt" > "$work/part.sorted"
if [ "$(cut -d' ' -f1 "$work/part.sorted" | uniq -d | wc -l)" -ne 0 ]; then fail "a step logged with two values"; fi
missing=$(grep -Fvxf "$work/full.txt" "$work/part.sorted" || true)
[ -z "$missing" ] || fail "losses differ from the uninterrupted run: $missing"
for ((s = expect_resume_step; s < 16; ++s)); do
  grep -q "^$s " "$work/part.sorted" || fail "step $s not logged"
done
[ "$resume_hash" = "$full_hash" ] || fail "final parameters differ: $resume_hash vs $full_hash"
echo "PASS: $mode: losses and final parameters bit-identical ($full_hash)"
