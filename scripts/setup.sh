#!/usr/bin/env bash
# Installs what building Petrel needs on Debian/Ubuntu when it is missing:
# a C++ compiler (RocksDB) and libclang (bindgen, for RocksDB's bindings).
# No system protoc is needed. Safe to run again; does nothing when all is
# present.
set -euo pipefail

command -v cargo >/dev/null 2>&1 || {
  echo "setup: cargo not found; install Rust (https://rustup.rs) first" >&2
  exit 1
}
need=()
command -v c++ >/dev/null 2>&1 || need+=(g++)
dpkg -s libclang-dev >/dev/null 2>&1 || need+=(libclang-dev)

if ((${#need[@]})); then
  echo "setup: installing ${need[*]}" >&2
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
