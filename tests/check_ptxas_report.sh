#!/bin/sh
# Fails when ptxas reports a serialized wgmma in the Hopper kernels (a divergent branch or too few
# registers around the multiplies makes it wait for each one: a silent slowdown of several times),
# or when the report holds no kernel at all. Usage: check_ptxas_report.sh REPORT
report=$1
if [ ! -s "$report" ]; then
  echo "no ptxas report at $report (build the dstrain_sm90 target first)" >&2
  exit 1
fi
kernels=$(grep -c "Compiling entry function" "$report")
if [ "$kernels" -eq 0 ]; then
  echo "the ptxas report $report names no kernel" >&2
  exit 1
fi
if grep -q "serialized" "$report"; then
  echo "ptxas serializes the wgmma instructions of $(grep -c serialized "$report") kernels, the first:" >&2
  grep "serialized" "$report" | head -3 | sed 's/^/  /' >&2
  exit 1
fi
echo "$kernels kernels, no serialized wgmma"
