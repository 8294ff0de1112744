#!/usr/bin/env bash
# Install dicom_node as a systemd service (config/systemd/dicom-node.service, rendered).
#
#   scripts/install-service.sh [--prefix DIR] [--config FILE] [--user NAME] [--render-only OUTDIR]
#
# --prefix       where the node is installed: DIR/bin/dicom-node must exist (default /opt/dicom-node;
#                make it with `python3 -m venv /opt/dicom-node && /opt/dicom-node/bin/pip install .`)
# --config       the node's TOML file the service reads (default /etc/dicom-node/node.toml; when missing,
#                the repository's config/node.toml is installed there to start from)
# --user         the system user the node runs as (default dicom-node; created when missing)
# --render-only  write OUTDIR/dicom-node.service and change nothing on this machine (no root needed)
#
# The data and model directories and the ports are read from the configuration (relative paths
# resolve in /var/lib/dicom-node, the service's working directory): rerun this script after
# changing data_dir, model_dir, or a port to one below 1024.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TEMPLATE="$REPO/config/systemd/dicom-node.service"
UNIT_NAME="dicom-node.service"
STATE_DIR="/var/lib/dicom-node"  # StateDirectory=dicom-node, the unit's WorkingDirectory

PREFIX="/opt/dicom-node"
CONFIG="/etc/dicom-node/node.toml"
SERVICE_USER="dicom-node"
RENDER_ONLY=""

die() { echo "install-service: $*" >&2; exit 1; }
usage() { sed -n '2,15s/^# \{0,1\}//p' "$0"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) PREFIX="${2:?--prefix needs a directory}"; shift 2 ;;
        --config) CONFIG="${2:?--config needs a file}"; shift 2 ;;
        --user) SERVICE_USER="${2:?--user needs a name}"; shift 2 ;;
        --render-only) RENDER_ONLY="${2:?--render-only needs a directory}"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done

# systemd splits ReadWritePaths= and ExecStart= on spaces; refuse rather than write a broken unit.
for value in "$PREFIX" "$CONFIG" "$SERVICE_USER"; do
    case "$value" in *[[:space:]]*) die "no spaces allowed: '$value'" ;; esac
done
[ "${PREFIX#/}" != "$PREFIX" ] || die "--prefix must be an absolute path: $PREFIX"
[ "${CONFIG#/}" != "$CONFIG" ] || die "--config must be an absolute path: $CONFIG"
PREFIX="${PREFIX%/}"
for value in "$PREFIX/" "$CONFIG"; do  # ProtectHome=yes hides these from the service
    case "$value" in
        /home/*|/root/*|/run/user/*) die "${value%/}: the unit's ProtectHome=yes hides it from the service; use /opt, /etc" ;;
    esac
done
PYTHON="$PREFIX/bin/python"
[ -x "$PREFIX/bin/dicom-node" ] && [ -x "$PYTHON" ] || die "no $PREFIX/bin/dicom-node: install the node first:
    python3 -m venv $PREFIX && $PREFIX/bin/pip install $REPO"

if [ -z "$RENDER_ONLY" ] && [ "$(id -u)" -ne 0 ]; then
    die "installing needs root (or use --render-only DIR to only write the unit)"
fi

# The group: the user's primary group when the user exists, else the one useradd --user-group makes.
if getent passwd "$SERVICE_USER" >/dev/null; then
    SERVICE_GROUP="$(id -gn "$SERVICE_USER")"
else
    SERVICE_GROUP="$SERVICE_USER"
fi

# Read the paths and ports from the configuration the service will read (the installed one, or the
# one about to be installed), with the node's own loader: a configuration that cannot load fails here,
# naming the key, not at the service's first start.
if [ -f "$CONFIG" ]; then SOURCE_CONFIG="$CONFIG"; else SOURCE_CONFIG="$REPO/config/node.toml"; fi
OUTDIR="${RENDER_ONLY:-$(mktemp -d)}"
mkdir -p "$OUTDIR"
RENDERED="$OUTDIR/$UNIT_NAME"
read -r DATA_DIR MODEL_DIR < <(
    "$PYTHON" - "$TEMPLATE" "$RENDERED" "$SOURCE_CONFIG" "$STATE_DIR" "$PREFIX" "$CONFIG" "$SERVICE_USER" \
        "$SERVICE_GROUP" <<'EOF'
import os
import re
import sys
from pathlib import Path

template, rendered, source_config, state_dir, prefix, config, user, group = sys.argv[1:]
# The service sees DICOM_NODE_CONFIG and its environment file, not the shell's DICOM_NODE_* variables.
for key in [k for k in os.environ if k.startswith("DICOM_NODE_")]:
    del os.environ[key]
from dicom_node.config import ConfigError, load_config

try:
    node = load_config(source_config)
except ConfigError as exc:
    sys.exit(f"install-service: {exc}")


def resolved(path: Path) -> str:
    text = os.path.normpath(os.path.join(state_dir, path))  # as the service's WorkingDirectory resolves it
    if any(c.isspace() for c in text):
        sys.exit(f"install-service: no spaces allowed in {text!r} (systemd splits ReadWritePaths on them)")
    return text


ports = [node.port] + ([node.tls.port] if node.tls.enabled else []) + ([node.http.port] if node.http.enabled else [])
# Ports below 1024 (DICOM's 104) need the one capability; otherwise the node has none at all.
capabilities = "CAP_NET_BIND_SERVICE" if any(0 < p < 1024 for p in ports) else ""
data_dir, model_dir = resolved(node.data_dir), resolved(node.model_dir)
values = {"@PREFIX@": prefix, "@CONFIG@": config, "@CONFIG_DIR@": os.path.dirname(config), "@USER@": user,
          "@GROUP@": group, "@DATA_DIR@": data_dir, "@MODEL_DIR@": model_dir, "@CAPABILITIES@": capabilities}
text = Path(template).read_text()
for placeholder, value in values.items():
    text = text.replace(placeholder, value)
left = sorted(set(re.findall(r"@[A-Z_]+@", text)))
if left:  # the template grew a placeholder this script does not know
    sys.exit(f"install-service: placeholders left unrendered: {left}")
Path(rendered).write_text(text)
print(data_dir, model_dir)
EOF
) || die "could not render the unit from $SOURCE_CONFIG"
[ -s "$RENDERED" ] || die "could not render the unit from $SOURCE_CONFIG"

if [ -n "$RENDER_ONLY" ]; then
    echo "rendered $RENDERED (data $DATA_DIR, model $MODEL_DIR, user $SERVICE_USER); nothing installed"
    exit 0
fi

if ! getent passwd "$SERVICE_USER" >/dev/null; then
    useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home --shell /usr/sbin/nologin \
        --comment "dicom_node DICOM AI node" "$SERVICE_USER"
    echo "created system user $SERVICE_USER"
fi
CONFIG_DIR="$(dirname "$CONFIG")"
install -d -m 0750 -o root -g "$SERVICE_GROUP" "$CONFIG_DIR"
if [ ! -f "$CONFIG" ]; then
    # root owns it, the node can read it: the node cannot change its own callers or destinations.
    install -m 0640 -o root -g "$SERVICE_GROUP" "$REPO/config/node.toml" "$CONFIG"
    echo "installed $CONFIG from config/node.toml: edit it (config/node.example.toml explains every key)"
fi
install -d -m 0750 -o "$SERVICE_USER" -g "$SERVICE_GROUP" "$STATE_DIR" "$DATA_DIR"
# An existing model directory is left as it is (read-only weights are fine: the runtime cache then
# goes to /var/cache/dicom-node); a missing one is made for `model fetch` to fill.
[ -d "$MODEL_DIR" ] || install -d -m 0750 -o "$SERVICE_USER" -g "$SERVICE_GROUP" "$MODEL_DIR"
install -m 0644 "$RENDERED" "/etc/systemd/system/$UNIT_NAME"
rm -rf "$OUTDIR"
echo "installed /etc/systemd/system/$UNIT_NAME"
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    echo "start it now and at every boot with:"
else
    echo "systemd is not running here; on the target machine run: systemctl daemon-reload, then"
fi
echo "    systemctl enable --now $UNIT_NAME"
