#!/usr/bin/env bash
# The main job on a fresh machine: build edged, compile the init-heavy sample with Wizer + AOT
# for both targets, and print the cold-start figures (release build).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
scripts/install-wasm-targets.sh
scripts/build-guests.sh
cargo build --release --locked -p edgectl -p bench
echo "== edgectl build guests/out/init-heavy-p1.wasm"
target/release/edgectl build guests/out/init-heavy-p1.wasm -o target/demo/init-heavy-p1
echo
echo "== cold-start figures"
target/release/bench --out bench/out
