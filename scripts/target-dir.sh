#!/usr/bin/env bash
# Prints the directory cargo builds the workspace in DIR into (default: the repository root):
# `<workspace>/target` unless CARGO_TARGET_DIR, CARGO_BUILD_TARGET_DIR or a config's
# `build.target-dir` moves it. Scripts that pick up build output ask this rather than assume
# `target/`, which is wrong as soon as one of those is set.
#
# Usage: target-dir.sh [DIR]
set -euo pipefail
cd "${1:-$(dirname "${BASH_SOURCE[0]}")/..}"
# --no-deps: no dependency resolution, so no network and no Cargo.lock writes.
cargo metadata --format-version 1 --no-deps |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])'
