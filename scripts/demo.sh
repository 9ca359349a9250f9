#!/usr/bin/env bash
# The main job on a fresh machine: build edged (release), start a node serving the sample
# functions, request each of them, then print the cold-start and HTTP figures.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
scripts/install-wasm-targets.sh
scripts/build-guests.sh
cargo build --release --locked -p edged -p edgectl -p bench

demo="$root/target/demo"
rm -rf "$demo" && mkdir -p "$demo"
echo "== edgectl build guests/out/init-heavy-p1.wasm (Wizer + AOT for both targets)"
target/release/edgectl build guests/out/init-heavy-p1.wasm -o "$demo/build"

cat > "$demo/edged.toml" <<TOML
[node]
state_dir = "$demo/state"
http_listen = "127.0.0.1:0"

[[function]]
name = "hello"
wasm = "$root/guests/out/hello-http.wasm"
route = "/hello"

[[function]]
name = "heavy"
wasm = "$root/guests/out/init-heavy-http.wasm"
route = "/heavy"

[[function]]
name = "cgi"
wasm = "$root/guests/out/init-heavy-p1.wasm"
route = "/cgi"
TOML

echo
echo "== starting edged"
target/release/edged --config "$demo/edged.toml" > "$demo/edged.out" 2> "$demo/edged.log" &
edged_pid=$!
trap 'kill $edged_pid 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do
  grep -q "listening on" "$demo/edged.out" 2>/dev/null && break
  kill -0 $edged_pid 2>/dev/null || { cat "$demo/edged.log"; exit 1; }
  sleep 0.1
done
addr=$(sed -n 's/^edged listening on //p' "$demo/edged.out")
echo "edged is serving on $addr"
for path in "/hello/demo" "/heavy?key=42" "/cgi?key=42"; do
  echo "-- GET $path"
  curl -sS -w '   (%{http_code}, %{time_total}s)\n' "$addr$path"
done
echo "-- /metrics (requests)"
curl -sS "$addr/metrics" | grep '^edged_requests_total'
kill -TERM $edged_pid
wait $edged_pid || true
trap - EXIT

echo
echo "== cold-start and HTTP figures"
target/release/bench --out bench/out
