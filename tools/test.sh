#!/usr/bin/env bash
# Set up the test environment (idempotent) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh --test
exec .venv-test/bin/python -m pytest "$@"
