#!/usr/bin/env bash
# Set up everything the tests need (Debian packages, a venv with pydm and its
# test extras) and run the test suite.  Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install-deps.sh
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q -e '.[test]'
exec .venv/bin/python -m pytest "$@"
