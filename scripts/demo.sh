#!/usr/bin/env bash
# The main job: build, then run two relay sites on loopback and show messages crossing.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
exec "${BUILD_DIR:-build}/relay/relay" demo "$@"
