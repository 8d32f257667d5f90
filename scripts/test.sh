#!/usr/bin/env bash
# The whole test suite: build, then run every unit and integration test with CTest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
cd "${BUILD_DIR:-build}"
ctest --output-on-failure --timeout 1500 "$@"
