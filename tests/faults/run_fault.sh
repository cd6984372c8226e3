#!/usr/bin/env bash
# Runs fault_main under mpirun -np 4 with one injected fault and checks that the job ends in time,
# with a message naming the operation and the rank(s) involved, and leaves no process behind.
#
#   run_fault.sh CASE FAULT_MAIN MPIEXEC
# CASE: healthy | skip | stall | kill | mismatch
set -u
case_name=$1
fault_main=$2
mpiexec=$3

timeout_s=8          # the collectives' timeout given to fault_main (generous: 4 ranks share 2 busy cores in CI)
margin_s=25          # start-up, the peers' answers, MPI_Abort and teardown on a busy 2-core machine
guard_s=$((timeout_s + margin_s + 60))  # wall-clock guard: the job must never get this far
tag="fault-$case_name-$$-$RANDOM"       # marks this job's processes for pgrep
log=$(mktemp)
trap 'rm -f "$log"' EXIT

args=(--timeout "$timeout_s" --steps 20 --count 1000 --step-ms 5 --at-step 5 --tag "$tag")
expect_rc=nonzero
limit_s=$((timeout_s + margin_s))
patterns=()
case "$case_name" in
  healthy)
    expect_rc=0
    patterns=("fault_main: rank 0 finished 20 steps")
    ;;
  skip)  # rank 2 skips step 5: the others end up waiting in the last allreduce that rank 2 never makes
    args+=(--skip-rank 2)
    patterns=("allreduce sum of 1000 fp32 \\(call #20\\) on mpi communicator \\(rank [013] of 4\\) timed out"
              "ranks that did not arrive: rank 2 \\(no answer")
    ;;
  stall)  # rank 1 sleeps far beyond the timeout inside step 5
    args+=(--stall-rank 1)
    patterns=("allreduce sum of 1000 fp32 \\(call #6\\) on mpi communicator \\(rank [023] of 4\\) timed out"
              "waited [0-9.]+ s \\(timeout ${timeout_s}.00 s\\)"
              "ranks that did not arrive: rank 1 \\(no answer")
    ;;
  kill)  # rank 3 dies by SIGKILL: the launcher reports it and ends the job
    args+=(--kill-rank 3)
    limit_s=$margin_s
    patterns=("rank 3 kills itself at step 5" "signal 9|Killed|killed")
    ;;
  mismatch)  # rank 3 calls with 1001 elements; the fingerprint check ends the job without waiting
    args+=(--mismatch-rank 3 --timeout 120)
    export DSTRAIN_DEBUG_COLLECTIVES=1
    limit_s=$margin_s
    patterns=("collective mismatch on mpi communicator"
              "ranks 0,1,2 called allreduce sum of 1000 fp32 \\(call #6\\); rank 3 called allreduce sum of 1001 fp32 \\(call #6\\)")
    ;;
  *)
    echo "run_fault.sh: unknown case $case_name" >&2
    exit 2
    ;;
esac

start=$(date +%s.%N)
timeout -k 5 "$guard_s" "$mpiexec" --oversubscribe --allow-run-as-root -np 4 \
  -x DSTRAIN_DEBUG_COLLECTIVES="${DSTRAIN_DEBUG_COLLECTIVES:-0}" \
  "$fault_main" "${args[@]}" >"$log" 2>&1
rc=$?
end=$(date +%s.%N)
elapsed=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
cat "$log"
echo "---- run_fault.sh $case_name: exit $rc after ${elapsed}s (limit ${limit_s}s)"

failed=0
# timeout(1) exits 124 (or 137 after -k); mpirun itself exits 137 when a rank died of SIGKILL.
guard_hit=0
if [ "$rc" -eq 124 ]; then guard_hit=1; fi
if [ "$rc" -eq 137 ] && awk -v e="$elapsed" -v g="$guard_s" 'BEGIN { exit !(e >= g) }'; then guard_hit=1; fi
if [ "$guard_hit" -eq 1 ]; then
  echo "FAIL: the wall-clock guard of ${guard_s}s ended the job: something waited forever"
  failed=1
elif [ "$expect_rc" = 0 ] && [ "$rc" -ne 0 ]; then
  echo "FAIL: expected exit 0"
  failed=1
elif [ "$expect_rc" = nonzero ] && [ "$rc" -eq 0 ]; then
  echo "FAIL: expected the job to fail"
  failed=1
fi
if awk -v e="$elapsed" -v l="$limit_s" 'BEGIN { exit !(e > l) }'; then
  echo "FAIL: took ${elapsed}s, more than ${limit_s}s"
  failed=1
fi
for pattern in "${patterns[@]}"; do
  if ! grep -Eq -- "$pattern" "$log"; then
    echo "FAIL: output lacks /$pattern/"
    failed=1
  fi
done
sleep 1
leftover=$(pgrep -f -- "$tag" || true)
if [ -n "$leftover" ]; then
  echo "FAIL: processes left behind: $leftover"
  for pid in $leftover; do kill -9 "$pid" 2>/dev/null; done
  failed=1
fi
if [ "$failed" -eq 0 ]; then
  echo "PASS: fault case $case_name"
fi
exit "$failed"
