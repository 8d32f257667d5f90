#!/bin/bash
# Runs integration test modules with every relay daemon confined roughly as relay@.service
# confines it, without systemd: the unit's system-call allow-list (seccomp, EPERM for the rest,
# as SystemCallFilter= with SystemCallErrorNumber=EPERM) and /proc limited to process folders
# (ProcSubset=pid), in a private mount namespace. Needs root, gcc, libseccomp.so.2 (the runtime
# library; no headers) and systemd-analyze.
#
#   bash scripts/unit-sandbox/run-tests.sh mattermost sneakernet diode security
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
bin=${RELAY_BIN:-$repo/build/relay/relay}
bin=$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")
work=$(mktemp -d /tmp/relay-unit-sandbox-XXXXXX)
trap 'rm -rf "$work"' EXIT
lib=$(ls /usr/lib/x86_64-linux-gnu/libseccomp.so.2 /usr/lib/*/libseccomp.so.2 2>/dev/null | head -1)
gcc -O1 -o "$work/seccomp-exec" "$here/seccomp-exec.c" "$lib"
python3 "$here/allow-list.py" "$repo/deploy/relay@.service" >"$work/allow.txt"
echo "$(wc -l <"$work/allow.txt") system calls allowed (from deploy/relay@.service)"
cat >"$work/relay" <<WRAP
#!/bin/sh
exec unshare --mount --propagation private /bin/sh -c 'mount -t proc -o subset=pid,hidepid=invisible proc /proc && exec "\$0" "\$@"' "$work/seccomp-exec" "$work/allow.txt" "$bin" "\$@"
WRAP
chmod +x "$work/relay"
RELAY_NO_SNAPSHOT=1 RELAY_BIN="$work/relay" python3 "$repo/tests/integration/run_tests.py" "$@"
