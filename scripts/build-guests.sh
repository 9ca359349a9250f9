#!/usr/bin/env bash
# Builds the sample guests from source into guests/out/: Rust guests for wasm32-wasip1 and
# wasm32-wasip2, and copies of the WAT edge-case guests. Idempotent and safe to run from several
# test processes at once (cargo locks its target dir; outputs are renamed into place).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$root/scripts/install-wasm-targets.sh"
cd "$root/guests"
# Where cargo put them: guests/target, or wherever CARGO_TARGET_DIR (or a config) points.
target=$("$root/scripts/target-dir.sh" "$root/guests")
# The middleware guests generate the `wasi:http/middleware` world (which the wasip3 crate does not
# bind) from the WIT the wasip3 crate ships: link its directory where they look for it.
wasip3_manifest=$(cargo metadata --format-version 1 --quiet |
  grep -o '"manifest_path":"[^"]*/wasip3-[0-9][^"]*/Cargo.toml"' | head -n1 | cut -d'"' -f4)
[ -n "$wasip3_manifest" ] || { echo "build-guests: wasip3 not found by cargo metadata" >&2; exit 1; }
ln -sfn "$(dirname "$wasip3_manifest")/wit" "$root/guests/.wasip3-wit"
cargo build --quiet --release --target wasm32-wasip1 -p init-heavy-p1 -p probe-p1
cargo build --quiet --release --target wasm32-wasip2 -p hello-http -p init-heavy-http -p outbound-http \
  -p p3-hello -p p3-echo -p p3-probe -p p3-init-heavy -p p3-auth -p p3-header -p p3-forward -p p3-pass
out="$root/guests/out"
mkdir -p "$out"
place() { # place SRC NAME: atomic copy into $out
  local tmp
  tmp=$(mktemp "$out/.$2.XXXXXX")
  # A missing source must not leave the temp file behind in guests/out.
  cp "$1" "$tmp" || { rm -f "$tmp"; return 1; }
  chmod 644 "$tmp"
  mv -f "$tmp" "$out/$2"
}
place "$target/wasm32-wasip1/release/init-heavy-p1.wasm" init-heavy-p1.wasm
place "$target/wasm32-wasip1/release/probe-p1.wasm" probe-p1.wasm
place "$target/wasm32-wasip2/release/hello_http.wasm" hello-http.wasm
place "$target/wasm32-wasip2/release/init_heavy_http.wasm" init-heavy-http.wasm
place "$target/wasm32-wasip2/release/outbound_http.wasm" outbound-http.wasm
for p3 in p3_hello p3_echo p3_probe p3_init_heavy p3_auth p3_header p3_forward p3_pass; do
  place "$target/wasm32-wasip2/release/$p3.wasm" "${p3//_/-}.wasm"
done
for wat in wat/*.wat; do
  place "$wat" "$(basename "$wat")"
done
