#!/bin/sh
# Compiler launcher for the Hopper kernels: runs the compile command (built with -Xptxas=-v) and
# keeps ptxas's report in REPORT, for the check that no wgmma is serialized
# (tests/check_ptxas_report.sh). Everything but ptxas's per-kernel info goes on to stderr.
# Usage: ptxas_report.sh REPORT COMMAND...
report=$1
shift
"$@" 2> "$report.part"
rc=$?
grep -v -E '^ptxas info|bytes stack frame|^ *Compile time' "$report.part" >&2
mv "$report.part" "$report"
exit $rc
