#!/usr/bin/env bash
# Set up everything the tests need (Debian packages, a venv with pydm and its
# test extras) and run the test suite.  Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install-deps.sh
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q -e '.[test]'
# libnbd's Python bindings (the NBD store, and NBD clients in the tests)
# come from Debian's python3-libnbd: link them into the venv
.venv/bin/python tools/link_libnbd.py
exec .venv/bin/python -m pytest "$@"
