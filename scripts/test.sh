#!/usr/bin/env bash
# Sets up what is missing, then builds and runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
cargo build --workspace --all-targets
# Integration tests start whole clusters; two at a time fits 2 cores.
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace -- --test-threads="${PETREL_TEST_THREADS:-2}" 2>&1 | tee "$log" || status=$?
# One closing line for the whole suite (cargo prints one per test binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
# The Helm chart: rendered, linted and validated with Helm v4 as a library
# and the Kubernetes schemas (Python packages in a venv outside the clone).
chart=0
bash scripts/chart-test.sh || chart=$?
[ "$chart" -eq 0 ] && echo "chart tests: ok" || { echo "chart tests: FAILED"; status=1; }
exit "$status"
