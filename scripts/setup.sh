#!/usr/bin/env bash
# Set up dicom_node in ./.venv (pinned dependencies; torch stays on the CPU build).
#   scripts/setup.sh            the node, and what `dicom-node model fetch` needs (modelscope)
#   scripts/setup.sh --test     plus test tools and the Debian packages of the test peers
# A runtime set-up whose pyproject.toml has not changed since the last one returns at once, without
# the network: `scripts/run-node.sh` calls this on every start (a service restart needs no PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."

WITH_TEST=0
[ "${1:-}" = "--test" ] && WITH_TEST=1

STAMP=.venv/.dicom-node-setup
WANT="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ $WITH_TEST -eq 0 ] && [ -x .venv/bin/dicom-node ] && [ -f "$STAMP" ] \
        && [ "$(cut -d' ' -f1 "$STAMP")" = "$WANT" ]; then
    echo "setup: up to date (.venv)"
    exit 0
fi

# postgresql: the server tests/postgres_fixtures.py starts for the shared job store's tests;
# gcc + libc6-dev: the exact postprocess's window kernel (dicom_node/model/window_kernel.c), which the
# tests require to be built (a node without them keeps the slower ATen path)
DEBIAN_TEST_PACKAGES=(dcmtk dicom3tools orthanc orthanc-dicomweb orthanc-python orthanc-gdcm chromium chromium-driver
                      postgresql gcc libc6-dev)

install_debian() {
    local missing=()
    for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "setup: installing Debian packages: ${missing[*]}"
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
}

PY=${PYTHON:-}
if [ -z "$PY" ]; then
    for c in python3.11 python3; do
        if command -v "$c" >/dev/null && "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
            PY=$c; break
        fi
    done
fi
[ -n "$PY" ] || { echo "setup: Python 3.11 is required" >&2; exit 1; }

if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
    .venv/bin/pip install -q --upgrade pip
fi
# torch first and pinned, so nothing later can pull another (CUDA) build.
.venv/bin/pip install -q "torch==2.13.0"
if [ $WITH_TEST -eq 1 ]; then
    install_debian "${DEBIAN_TEST_PACKAGES[@]}"
    command -v npm >/dev/null || install_debian npm  # a NodeSource npm is kept: Debian's would conflict with it
    .venv/bin/pip install -q -e ".[test]"
    # The OHIF viewer of tests/test_ohif_viewer.py (npm pack @ohif/app into ~/.cache/dicom_node, no build),
    # fetched now so that the tests need no registry; the test fetches it itself if this failed.
    .venv/bin/python -m tests.ohif_fixtures \
        || echo "setup: WARNING: could not fetch the OHIF viewer; tests/test_ohif_viewer.py needs it" >&2
else
    .venv/bin/pip install -q -e ".[fetch]"
fi
.venv/bin/python -c "import torch, dicom_node; assert torch.__version__.startswith('2.13.0'), torch.__version__"
echo "$WANT $([ $WITH_TEST -eq 1 ] && echo test || echo runtime)" > "$STAMP"
echo "setup: ready (.venv)"
