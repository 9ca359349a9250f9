#!/usr/bin/env bash
# The main job on a fresh machine: build edged (release), start a node on the embedded dev
# default config, push the sample functions to it over QUIC, request them, and print the
# cold-start and HTTP figures.
#
# Usage: scripts/demo.sh [--no-bench]   (--no-bench: everything but the figures, a few minutes)
set -euo pipefail
bench=1
for arg in "$@"; do
  case "$arg" in
    --no-bench) bench=0 ;;
    *) echo "usage: scripts/demo.sh [--no-bench]" >&2; exit 2 ;;
  esac
done
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
scripts/install-wasm-targets.sh
scripts/build-guests.sh
if [ "$bench" = 1 ]; then
  cargo build --release --locked -p edged -p edgectl -p bench
else
  cargo build --release --locked -p edged -p edgectl
fi
# target/, or wherever CARGO_TARGET_DIR (or a cargo config) puts builds.
target=$(scripts/target-dir.sh)
edged="$target/release/edged"
edgectl="$target/release/edgectl"

demo="$target/demo"
rm -rf "$demo" && mkdir -p "$demo"
echo "== edgectl build guests/out/init-heavy-p1.wasm (Wizer + AOT for both targets)"
"$edgectl" build guests/out/init-heavy-p1.wasm -o "$demo/build"

echo
echo "== starting edged on its embedded dev default (HTTP 127.0.0.1:8080, QUIC 127.0.0.1:7443)"
# The dev default keeps its state and a throwaway fleet identity in ./.edged-dev.
(cd "$demo" && exec "$edged") > "$demo/edged.out" 2> "$demo/edged.log" &
edged_pid=$!
trap 'kill $edged_pid 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do
  grep -q "listening on" "$demo/edged.out" 2>/dev/null && break
  kill -0 $edged_pid 2>/dev/null || { cat "$demo/edged.log"; exit 1; }
  sleep 0.1
done
addr=$(sed -n 's/^edged listening on //p' "$demo/edged.out")
export EDGECTL_IDENTITY="$demo/.edged-dev/identity" EDGECTL_NODE=127.0.0.1:7443

echo
echo "== edgectl push (compile for both targets, sign, upload what the node lacks, activate)"
"$edgectl" push guests/out/hello-http.wasm --name hello
"$edgectl" push guests/out/init-heavy-http.wasm --name heavy
"$edgectl" push guests/out/init-heavy-p1.wasm --name cgi
"$edgectl" push guests/out/p3-hello.wasm --name p3
# A middleware chain composed into one artifact: auth (401 without the bearer token), then a
# header middleware that logs the path and adds x-edged-middleware, then the p3 hello.
"$edgectl" push guests/out/p3-hello.wasm --name chain \
  --middleware guests/out/p3-auth.wasm --middleware guests/out/p3-header.wasm
"$edgectl" ls

echo
for path in "/hello/demo" "/heavy?key=42" "/cgi?key=42" "/p3"; do
  echo "-- GET $addr$path"
  curl -sS -w '   (HTTP %{http_code} in %{time_total}s)\n' "$addr$path"
done
echo "-- GET $addr/chain without, then with the sample bearer token"
curl -sS -w '   (HTTP %{http_code} in %{time_total}s)\n' "$addr/chain"
curl -sS -i -H 'authorization: Bearer edged-sample-token' "$addr/chain" | grep -i -E '^(HTTP|x-edged-middleware)|hello'
echo "-- /metrics (requests)"
curl -sS "$addr/metrics" | grep '^edged_requests_total'
kill -TERM $edged_pid
wait $edged_pid || true
trap - EXIT

if [ "$bench" = 0 ]; then
  echo
  echo "== done (--no-bench: figures skipped)"
  exit 0
fi

echo
echo "== cold-start and HTTP figures"
# Baselines the HTTP phase compares against in the same run: the real `wasmtime serve` 48.0.8
# (built once into ~/.cache/edged/tools) and a componentize-py hello.
wasmtime_cli=$(scripts/install-wasmtime-cli.sh)
if [ -x scripts/build-large-guests.sh ]; then scripts/build-large-guests.sh; fi
"$target/release/bench" --wasmtime "$wasmtime_cli" --out bench/out
