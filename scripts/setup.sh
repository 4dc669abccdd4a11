#!/usr/bin/env bash
# Installs what building Petrel needs on Debian/Ubuntu when it is missing:
# a C++ compiler and libclang (RocksDB's bindings). No system protoc is
# needed. Safe to run again; does nothing when all is present.
set -euo pipefail

need=()
command -v cargo >/dev/null 2>&1 || { echo "setup: cargo not found; install Rust from https://rustup.rs first" >&2; exit 1; }
command -v c++ >/dev/null 2>&1 || need+=(g++)
command -v clang >/dev/null 2>&1 || need+=(clang)
if ! ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 && ! ls /usr/lib/x86_64-linux-gnu/libclang*.so* >/dev/null 2>&1; then
  need+=(libclang-dev)
fi
dpkg -s libclang-dev >/dev/null 2>&1 || need+=(libclang-dev)

if ((${#need[@]})); then
  echo "setup: installing ${need[*]}" >&2
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
