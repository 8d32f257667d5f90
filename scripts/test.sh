#!/usr/bin/env bash
# The whole test suite: build, then run every unit and integration test with CTest; then the
# same suite again on a build with AddressSanitizer + UndefinedBehaviorSanitizer + LeakSanitizer
# (scripts/test-sanitizers.sh, which trims long loops under the sanitizers, not coverage).
# RELAY_SANITIZERS=0 skips the second pass (for a quick local run). Extra arguments go to both
# ctest runs.
set -euo pipefail
cd "$(dirname "$0")/.."
RELAY_WERROR=ON bash scripts/build.sh  # warnings are errors here, and only here
status=0
(cd "${BUILD_DIR:-build}" && ctest -j"${JOBS:-2}" --output-on-failure --timeout 1500 "$@") || status=$?
if [ "${RELAY_SANITIZERS:-1}" != 0 ]; then
  echo "==== the suite again under AddressSanitizer + UndefinedBehaviorSanitizer ===="
  bash scripts/test-sanitizers.sh "$@" || status=1
fi
exit $status
