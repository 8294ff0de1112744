#!/usr/bin/env bash
# Set up (venv, pinned deps, Debian test peers) and run the whole test suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
.venv/bin/ruff check .
exec .venv/bin/pytest -q "$@"
