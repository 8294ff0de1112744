#!/usr/bin/env bash
# Set up ./.venv (pinned dependencies) and start the node on the embedded defaults (config/node.toml).
# Extra arguments go to `dicom-node serve` (e.g. --config my-node.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/dicom-node serve "$@"
