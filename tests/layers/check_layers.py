#!/usr/bin/env python3
"""Fails on the first #include that points up the layers of docs/style.md ("Layers").

Each folder may include only its own headers and those of folders below it in LAYERS.
Run from anywhere: python3 tests/layers/check_layers.py [project root].
"""
import pathlib
import re
import sys

LAYERS = ["base", "event", "crypto", "queue", "config", "transports", "chat", "relay"]
INCLUDE = re.compile(r'^\s*#\s*include\s+"([a-z_]+)/[^"]+"')


def main() -> int:
    root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else __file__).resolve()
    if root.is_file():
        root = root.parents[2]
    rank = {name: i for i, name in enumerate(LAYERS)}
    bad = []
    checked = 0
    for folder in LAYERS:
        for path in sorted((root / folder).rglob("*")):
            if path.suffix not in (".h", ".cc"):
                continue
            checked += 1
            for n, line in enumerate(path.read_text().splitlines(), 1):
                m = INCLUDE.match(line)
                if m and m.group(1) in rank and rank[m.group(1)] > rank[folder]:
                    bad.append(f"{path.relative_to(root)}:{n}: includes {m.group(1)}/, "
                               f"a layer above {folder}/ ({' < '.join(LAYERS)})")
    if checked == 0:
        print(f"check_layers: no sources found under {root}", file=sys.stderr)
        return 1
    for b in bad:
        print(b, file=sys.stderr)
    print(f"check_layers: {checked} files, {len(bad)} includes pointing up")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
