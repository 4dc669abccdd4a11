# Sourced by the scripts: one target directory outside the clone, shared by
# tests and binaries (one profile), so RocksDB is compiled once per machine.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/petrel-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
