#!/usr/bin/env bash
# Install Debian's dataset-fashion-mnist when it is missing; never fail the build over it
# (tests that need the data skip with a reason, and kdkit says how to install it).
set -u
dir=/usr/share/datasets/fashion-mnist
if [ -n "${KDKIT_DATA:-}" ] || [ -f "$dir/train-images-idx3-ubyte.gz" ]; then
  exit 0
fi
sudo=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null 2>&1 && sudo="sudo -n" || {
    echo "kdkit: Fashion-MNIST missing; install it with: sudo apt-get install dataset-fashion-mnist" >&2
    exit 0
  }
fi
echo "kdkit: installing dataset-fashion-mnist with apt-get" >&2
$sudo apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
  || { $sudo apt-get update -q >/dev/null 2>&1 && $sudo apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } \
  || echo "kdkit: could not install dataset-fashion-mnist; tests that need it will skip" >&2
exit 0
