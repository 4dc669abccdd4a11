#!/usr/bin/env bash
# Sets up what is missing, then builds and runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
cargo build --workspace --all-targets
# Integration tests start whole clusters; two at a time fits 2 cores.
cargo test --workspace -- --test-threads="${PETREL_TEST_THREADS:-2}"
