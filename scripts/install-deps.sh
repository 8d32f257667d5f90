#!/usr/bin/env bash
# Installs the Debian 12 packages that relay's build, tests, demo and benchmark need.
# Idempotent: packages already present are left alone. Run as root (or with sudo).
set -euo pipefail

packages=(
  build-essential cmake pkg-config ninja-build
  libzmq3-dev cppzmq-dev libsodium-dev librocksdb-dev libmsgpack-cxx-dev
  libboost-program-options-dev libboost-dev
  libsimdjson-dev catch2
  libcurl4-openssl-dev libssl-dev nlohmann-json3-dev libisal-dev libsystemd-dev systemd
  python3 curl dpkg-dev
  faketime util-linux procps
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
