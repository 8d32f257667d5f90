#!/usr/bin/env bash
# The test suite under AddressSanitizer + UndefinedBehaviorSanitizer (and LeakSanitizer), in its
# own build folder. Any sanitizer report in a unit test fails it; reports from the relay daemons
# started by the integration tests are collected from their logs and fail the run too.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
BUILD_DIR=${BUILD_DIR:-build-sanitize}
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Debug -DRELAY_SANITIZE=ON \
  -DRELAY_WERROR=ON >/dev/null
ninja -C "$BUILD_DIR" -j"${JOBS:-2}"
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=0
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
logs=$(mktemp -d)
export RELAY_KEEP_LOGS=$logs
# Tests read this to shorten loops and relax timing-only expectations (never to skip checks).
export RELAY_SANITIZED=1
status=0
(cd "$BUILD_DIR" && ctest -j"${JOBS:-2}" --output-on-failure --timeout 1500 -E "bench_smoke|packaging" "$@") || status=$?
if grep -l "AddressSanitizer\|LeakSanitizer\|runtime error" "$logs"/*/*/relay.log 2>/dev/null; then
  echo "sanitizer reports in the daemons' logs above" >&2
  status=1
fi
rm -rf "$logs"
exit $status
