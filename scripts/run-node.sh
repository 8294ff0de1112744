#!/usr/bin/env bash
# Set up ./.venv (pinned dependencies, the model download included) and start the node on the
# embedded defaults (config/node.toml). Extra arguments go to `dicom-node serve` (e.g. --config my-node.toml).
#
# Without a model the node starts anyway: it receives and queues photos, downloads the official
# weights in the background when the ModelScope hub is reachable (auto_fetch_model), says "no model"
# on /readyz and in its log until they are there, and parses the queue as soon as they are.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/dicom-node serve "$@"
