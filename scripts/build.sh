#!/usr/bin/env bash
# Installs the build dependencies (Debian 12) and builds relay into ./build (or $BUILD_DIR).
# RELAY_WERROR=ON makes warnings errors (the test command sets it; off by default).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
BUILD_DIR=${BUILD_DIR:-build}
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=${BUILD_TYPE:-RelWithDebInfo} \
  -DRELAY_WERROR=${RELAY_WERROR:-OFF} >/dev/null
ninja -C "$BUILD_DIR" -j"${JOBS:-2}"
