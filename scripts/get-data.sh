#!/usr/bin/env bash
# Install Debian's dataset-fashion-mnist (the vision demo and tests) and, with `lm`,
# python3.11-doc (the reST sources of the Python docs: `kdkit demo lm`) when missing; never
# fail the build over them (tests that need the data skip with a reason, and kdkit says how
# to install it; the LM demo falls back to the stdlib's own sources).
set -u
want=${1:-vision}
sudo=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1; then sudo="sudo -n"; else sudo="none"; fi
fi

install() {  # install PACKAGE, once, quietly
  if [ "$sudo" = none ]; then
    echo "kdkit: $1 missing; install it with: sudo apt-get install $1" >&2
    return 0
  fi
  echo "kdkit: installing $1 with apt-get" >&2
  $sudo apt-get install -y -q "$1" >/dev/null 2>&1 \
    || { $sudo apt-get update -q >/dev/null 2>&1 && $sudo apt-get install -y -q "$1" >/dev/null 2>&1; } \
    || echo "kdkit: could not install $1" >&2
}

if [ "$want" = lm ]; then
  [ -d /usr/share/doc/python3.11/html/_sources ] || install python3.11-doc
  exit 0
fi
dir=/usr/share/datasets/fashion-mnist
if [ -z "${KDKIT_DATA:-}" ] && [ ! -f "$dir/train-images-idx3-ubyte.gz" ]; then
  install dataset-fashion-mnist
fi
exit 0
