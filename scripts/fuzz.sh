#!/usr/bin/env bash
# Builds the libFuzzer targets (fuzz/) with clang + ASan/UBSan in build-fuzz/ and runs each for a
# bounded time on a copy of its seed corpus (fuzz/corpus/<target>/).
#   scripts/fuzz.sh [SECONDS_PER_TARGET]        (default 60)
#   FUZZ_TARGETS="frame bundle" scripts/fuzz.sh 30   (a subset)
# Prints per target the executions and whether it crashed; exits non-zero on any crash, leak,
# timeout or out-of-memory. Artifacts (the crashing inputs) and logs: build-fuzz/fuzz-runs/.
# Installs clang and the libFuzzer runtime (Debian 12: clang-14, libclang-rt-14-dev) if missing,
# so the ordinary build and tests never need clang. See docs/security.md, "Fuzzing".
set -euo pipefail

seconds="${1:-60}"
case "$seconds" in '' | *[!0-9]*) echo "usage: $0 [SECONDS_PER_TARGET]" >&2; exit 2 ;; esac
root="$(cd "$(dirname "$0")/.." && pwd)"
build="${FUZZ_BUILD_DIR:-$root/build-fuzz}"
targets=(${FUZZ_TARGETS:-config ingest_json event frame bundle diode mattermost_json})

# --- clang and the libFuzzer runtime --------------------------------------------------------
need=()
for p in clang libclang-rt-14-dev; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "fuzz.sh: installing ${need[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO=sudo
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

# --- build ----------------------------------------------------------------------------------
if [ ! -f "$build/build.ninja" ]; then
  CC=clang CXX=clang++ cmake -S "$root" -B "$build" -G Ninja -DRELAY_FUZZ=ON -DRELAY_WERROR=OFF \
    -DCMAKE_BUILD_TYPE=RelWithDebInfo
fi
cmake --build "$build" --target relay_fuzz

# --- run ------------------------------------------------------------------------------------
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:symbolize=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}"
runs="$build/fuzz-runs"
mkdir -p "$runs"
failed=0
total=0
printf '%-16s %14s  %s\n' target executions result
for t in "${targets[@]}"; do
  bin="$build/fuzz/relay_fuzz_$t"
  out="$runs/$t"
  rm -rf "$out"
  mkdir -p "$out/corpus" "$out/artifacts"
  if [ -d "$root/fuzz/corpus/$t" ]; then cp -r "$root/fuzz/corpus/$t/." "$out/corpus/"; fi
  rc=0
  "$bin" -max_total_time="$seconds" -print_final_stats=1 -timeout=10 -rss_limit_mb=2048 \
    -max_len=65536 -artifact_prefix="$out/artifacts/" "$out/corpus" >"$out/log" 2>&1 || rc=$?
  execs="$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$out/log" | tail -1 |
    grep -o '[0-9]*$' || true)"
  execs="${execs:-0}"
  total=$((total + execs))
  artifacts="$(ls -A "$out/artifacts")"
  if [ "$rc" -ne 0 ] || [ -n "$artifacts" ]; then
    failed=1
    what="$(grep -m1 -E 'ERROR: (AddressSanitizer|LeakSanitizer|libFuzzer)|runtime error:|SUMMARY' \
      "$out/log" || true)"
    printf '%-16s %14s  CRASH (exit %s): %s\n' "$t" "$execs" "$rc" "${what:-see log}"
    for a in $artifacts; do echo "                 input: $out/artifacts/$a"; done
    echo "                 log:   $out/log"
  else
    printf '%-16s %14s  ok\n' "$t" "$execs"
  fi
done
printf '%-16s %14s\n' total "$total"
exit "$failed"
