#!/usr/bin/env bash
# Installs the Debian packages dstrain needs to build, test and run its example, if missing.
# The CUDA toolkit (with NCCL and cuDNN) is optional: without nvcc the build is CPU-only.
set -euo pipefail
packages=(cmake g++ make libopenmpi-dev openmpi-bin libeigen3-dev catch2 zlib1g-dev dataset-fashion-mnist
          procps python3)  # procps: pgrep, which the fault tests use; python3: the bench summary's test
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all packages present"
  exit 0
fi
sudo=""
if [ "$(id -u)" != 0 ]; then sudo=sudo; fi
echo "install-deps: installing ${missing[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
