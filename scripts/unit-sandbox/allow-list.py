#!/usr/bin/env python3
"""Prints the system calls deploy/relay@.service allows, one per line: its SystemCallFilter= lines
applied in order as systemd does (the first, an allow list, sets the list; later lines add to it,
or with "~" remove from it), with groups expanded by `systemd-analyze syscall-filter`."""
import subprocess
import sys


def expand(name, cache={}):
    if not name.startswith("@"):
        return {name}
    if name not in cache:
        out = subprocess.run(["systemd-analyze", "syscall-filter", name], capture_output=True,
                             text=True, check=True).stdout.splitlines()
        members, inside = set(), False
        for line in (l.strip() for l in out):
            if line == name:
                inside = True
            elif inside and not line:
                break
            elif inside and not line.startswith("#"):
                members |= expand(line)
        cache[name] = members
    return cache[name]


allowed = None
for line in open(sys.argv[1]):
    line = line.strip()
    if not line.startswith("SystemCallFilter="):
        continue
    value = line.split("=", 1)[1]
    deny = value.startswith("~")
    names = set().union(*(expand(n) for n in value.lstrip("~").split()))
    if allowed is None:
        if deny:
            sys.exit("the unit's first SystemCallFilter= is a deny list; not handled here")
        allowed = names
    elif deny:
        allowed -= names
    else:
        allowed |= names
print("\n".join(sorted(allowed or ())))
