#!/usr/bin/env bash
# Set up (venv, pinned deps, Debian test peers), then ruff, mypy and the whole test suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
.venv/bin/ruff check .
.venv/bin/mypy  # the whole package ([tool.mypy] in pyproject.toml)
exec .venv/bin/pytest -q "$@"
