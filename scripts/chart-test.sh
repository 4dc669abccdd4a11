#!/usr/bin/env bash
# Tests the Helm chart (deploy/helm/petrel) with the real Helm engine and
# the Kubernetes schemas, from Python packages only (no helm binary, no
# cluster): a virtualenv outside the clone gets pinned helm-python-sdk
# (Helm v4 as a library) and kubernetes-validate. Needs the binaries built
# (their --help is checked against the chart's flags).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
VENV="${PETREL_VENV:-$HOME/.cache/petrel-venv}"
if ! "$VENV/bin/python" -c 'import helm_python, kubernetes_validate, yaml' 2>/dev/null; then
  command -v python3 >/dev/null || { echo "chart-test: python3 not found" >&2; exit 1; }
  python3 -m venv "$VENV" 2>/dev/null || {
    echo "chart-test: installing python3-venv" >&2
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv >/dev/null
    python3 -m venv "$VENV"
  }
  "$VENV/bin/pip" install -q helm-python-sdk==0.2.2 kubernetes-validate==1.37.0 PyYAML==6.0.4
fi
"$VENV/bin/python" deploy/helm/test_chart.py "$CARGO_TARGET_DIR/debug"
