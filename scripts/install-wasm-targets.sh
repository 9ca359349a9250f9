#!/usr/bin/env bash
# Installs the rustup targets edged's guests and cross builds need. Idempotent: only missing
# targets are added. Usage: install-wasm-targets.sh [extra-target ...]
set -euo pipefail
wanted=(wasm32-wasip1 wasm32-wasip2 "$@")
installed=$(rustup target list --installed)
missing=()
for t in "${wanted[@]}"; do
  grep -qx "$t" <<<"$installed" || missing+=("$t")
done
if [ ${#missing[@]} -gt 0 ]; then
  rustup target add "${missing[@]}"
fi
