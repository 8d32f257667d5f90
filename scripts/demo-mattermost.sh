#!/usr/bin/env bash
# Build, then bridge two emulated Mattermost servers with two relay sites on loopback and play a
# short conversation across them (post, thread reply, edit, reaction, file, delete, downtime).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
exec python3 scripts/mattermost_demo.py "$@"
