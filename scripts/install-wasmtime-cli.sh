#!/usr/bin/env bash
# Installs the real `wasmtime` CLI 48.0.8 (the version edged's wasmtime crates are pinned to) for
# the bench's `wasmtime serve` rows, from crates.io into a cache directory, once. Idempotent:
# prints the binary's path, and builds only when it is missing or another version.
# Usage: scripts/install-wasmtime-cli.sh   (EDGED_TOOLS_DIR overrides ~/.cache/edged/tools)
set -euo pipefail
version=48.0.8
root="${EDGED_TOOLS_DIR:-$HOME/.cache/edged/tools}/wasmtime-$version"
bin="$root/bin/wasmtime"
if [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -q "^wasmtime $version"; then
  echo "$bin"
  exit 0
fi
mkdir -p "$root"
echo "building wasmtime-cli $version into $root (once; takes a while)" >&2
# A build dir of its own, kept: an interrupted build resumes where it stopped.
cargo install wasmtime-cli --version "$version" --locked --root "$root" \
  --target-dir "$root/build" --quiet >&2
"$bin" --version >&2
echo "$bin"
