#!/bin/sh
# Extract CPython 3.11's Lib/test/test_concurrent_futures.py (the peer suite of
# tests/adapters/test_cpython_futures.py) from Debian's libpython3.11-testsuite
# into /tmp/shardc-peer/cpython (or $1): this interpreter's stdlib ships without
# its test files.  Nothing is copied into the repository.
set -eu
dest=${1:-/tmp/shardc-peer/cpython}
f=$dest/usr/lib/python3.11/test/test_concurrent_futures.py
[ -f "$f" ] && { echo "$f"; exit 0; }
mkdir -p "$dest"
tmp=$(mktemp -d)
(cd "$tmp" && apt-get download libpython3.11-testsuite >/dev/null 2>&1)
dpkg -x "$tmp"/libpython3.11-testsuite_*.deb "$tmp/x"
mkdir -p "$(dirname "$f")"
cp "$tmp/x/usr/lib/python3.11/test/test_concurrent_futures.py" "$f"
rm -rf "$tmp"
echo "$f"
