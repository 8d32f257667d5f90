#!/usr/bin/env bash
# Builds the Debian package from a build tree (cpack into a temporary folder; the build tree is
# only read) and checks what is in it: files, control fields, maintainer scripts, and that the
# packaged binary runs.
# usage: test_package.sh BUILD_DIR SOURCE_DIR VERSION
set -euo pipefail

build=$(cd "$1" && pwd)
src=$(cd "$2" && pwd)
version=$3

tmp=$(mktemp -d "${TMPDIR:-/tmp}/relay-packaging.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

failures=0
fail() { echo "FAIL: $*" >&2; failures=$((failures + 1)); }
ok() { echo "ok: $*"; }

# --- build the .deb -----------------------------------------------------------------------------
if ! cpack --config "$build/CPackConfig.cmake" -G DEB -B "$tmp/out" >"$tmp/cpack.log" 2>&1; then
  cat "$tmp/cpack.log" >&2
  echo "FAIL: cpack could not build the package" >&2
  exit 1
fi
shopt -s nullglob
debs=("$tmp"/out/*.deb)
if [ ${#debs[@]} -ne 1 ]; then
  cat "$tmp/cpack.log" >&2
  echo "FAIL: expected one .deb in $tmp/out, found ${#debs[@]}" >&2
  exit 1
fi
deb=${debs[0]}
ok "built $(basename "$deb") ($(stat -c %s "$deb") bytes)"

# --- contents -----------------------------------------------------------------------------------
dpkg-deb -c "$deb" | awk '{print $6}' | sed 's|^\./|/|' >"$tmp/contents"
expect_file() {
  if grep -qxF "$1" "$tmp/contents"; then ok "contains $1"; else fail "missing $1"; fi
}
expect_file /usr/bin/relay
expect_file /lib/systemd/system/relay@.service
expect_file /usr/share/man/man8/relay.8.gz
expect_file /usr/share/doc/relay/README.md
for f in "$src"/docs/*.md; do expect_file "/usr/share/doc/relay/$(basename "$f")"; done
for f in "$src"/deploy/examples/*.conf; do expect_file "/usr/share/doc/relay/examples/$(basename "$f")"; done
for f in "$src"/deploy/relay@.service.d/*.conf.example; do
  expect_file "/usr/share/doc/relay/examples/relay@.service.d/$(basename "$f")"
done
if grep -q '^/usr/local/' "$tmp/contents"; then fail "files under /usr/local in the package"; fi
if grep -q '^/usr/lib/systemd/' "$tmp/contents"; then fail "unit under /usr/lib/systemd (expected /lib/systemd)"; fi
owners=$(dpkg-deb -c "$deb" | awk '{print $2}' | sort -u | tr '\n' ' ')
if [ "$owners" = "root/root " ]; then ok "every file owned by root/root"; else fail "file owners: $owners"; fi

# --- control fields -----------------------------------------------------------------------------
field() { dpkg-deb -f "$deb" "$1"; }
expect_field() {
  local value
  value=$(field "$1")
  if [ "$value" = "$2" ]; then ok "$1: $value"; else fail "$1 is '$value', expected '$2'"; fi
}
expect_field Package relay
expect_field Version "$version"
expect_field Section net
expect_field Maintainer "relay team <relay@example.invalid>"
depends=$(field Depends)
echo "Depends: $depends"
for lib in libc6 libzmq5 libsodium23 librocksdb libcurl4 libisal2 libboost-program-options; do
  if [[ "$depends" == *"$lib"* ]]; then ok "Depends names $lib"; else fail "Depends lacks $lib"; fi
done

# --- maintainer scripts -------------------------------------------------------------------------
dpkg-deb -e "$deb" "$tmp/control"
for s in postinst prerm postrm; do
  if [ -x "$tmp/control/$s" ]; then ok "$s present and executable"; else fail "$s missing or not executable"; fi
  if [ -f "$tmp/control/$s" ] && ! sh -n "$tmp/control/$s"; then fail "$s: shell syntax error"; fi
done
expect_in_postinst() {
  if grep -qF -- "$1" "$tmp/control/postinst" 2>/dev/null; then ok "postinst: $1"; else fail "postinst lacks: $1"; fi
}
expect_in_postinst "adduser --system --group --home /var/lib/relay --no-create-home"
expect_in_postinst "useradd --system"
expect_in_postinst "chown relay:relay /etc/relay"
expect_in_postinst "chmod 0700 /etc/relay"
expect_in_postinst "chmod 0750 /var/lib/relay"
expect_in_postinst "[ -d /run/systemd/system ]"
expect_in_postinst "systemctl try-restart 'relay@*.service'"
if grep -qF "deluser" "$tmp/control/postrm" 2>/dev/null && grep -q "^purge)" "$tmp/control/postrm"; then
  ok "postrm removes the user on purge"
else
  fail "postrm does not remove the user on purge"
fi

# --- the packaged files work ----------------------------------------------------------------------
dpkg-deb -x "$deb" "$tmp/root"
if out=$("$tmp/root/usr/bin/relay" --help 2>&1) && [[ "$out" == *"usage: relay"* ]]; then
  ok "packaged relay --help exits 0"
else
  fail "packaged relay --help failed: $out"
fi
if gzip -t "$tmp/root/usr/share/man/man8/relay.8.gz" 2>/dev/null; then ok "man page is gzip"; else fail "man page is not valid gzip"; fi
if command -v groff >/dev/null; then
  warnings=$(zcat "$tmp/root/usr/share/man/man8/relay.8.gz" | groff -man -Tutf8 -ww -z 2>&1 || true)
  if [ -z "$warnings" ]; then ok "man page renders without warnings"; else fail "groff: $warnings"; fi
fi

if [ "$failures" -ne 0 ]; then
  echo "$failures check(s) failed" >&2
  exit 1
fi
echo "all packaging checks passed"
