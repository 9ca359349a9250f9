#!/usr/bin/env bash
# Push throughput per QUIC congestion controller over an emulated edge link: a real edged (the
# embedded dev default) behind scripts/udp-link.py on loopback, one `edgectl push` of a module
# with a large data segment per controller and loss rate. Prints MB/s against the line rate and
# writes bench/out/congestion.json.
#
# Usage: scripts/bench-congestion.sh [--mb 6] [--rate-mbit 10] [--delay-ms 50] [--losses "1 0"]
# Needs release builds of edged and edgectl (cargo build --release -p edged -p edgectl).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mb=6 rate=10 delay=50 losses="1 0"
while [ $# -gt 0 ]; do
  case "$1" in
    --mb) mb=$2; shift 2 ;;
    --rate-mbit) rate=$2; shift 2 ;;
    --delay-ms) delay=$2; shift 2 ;;
    --losses) losses=$2; shift 2 ;;
    *) echo "usage: $0 [--mb N] [--rate-mbit R] [--delay-ms D] [--losses \"1 0\"]" >&2; exit 2 ;;
  esac
done
target=$("$root/scripts/target-dir.sh")
edged="$target/release/edged" edgectl="$target/release/edgectl"
for bin in "$edged" "$edgectl"; do
  [ -x "$bin" ] || { echo "bench-congestion: $bin is missing: cargo build --release -p edged -p edgectl" >&2; exit 1; }
done
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

# A p1 command whose one data segment is $mb MiB of random bytes (incompressible, like code):
# a new one for every push, since the node keeps blobs by content and would be sent nothing.
cat >"$work/gen.py" <<'EOF'
import os, sys
def leb(n):
    out = bytearray()
    while True:
        b, n = n & 0x7f, n >> 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)
def sec(i, body): return bytes([i]) + leb(len(body)) + body
data = os.urandom(int(sys.argv[2]) << 20)
m = b"\0asm\x01\0\0\0" + sec(1, leb(1) + b"\x60\x00\x00") + sec(3, leb(1) + leb(0))
m += sec(5, leb(1) + b"\x00" + leb(len(data) // 65536 + 1))
m += sec(7, leb(1) + leb(6) + b"_start" + b"\x00" + leb(0))
m += sec(10, leb(1) + leb(2) + b"\x00\x0b")
m += sec(11, leb(1) + b"\x00\x41\x00\x0b" + leb(len(data)) + data)
open(sys.argv[1], "wb").write(m)
EOF

(cd "$work" && exec "$edged") >"$work/edged.out" 2>"$work/edged.log" &
pids+=($!)
for _ in $(seq 1 300); do grep -q "listening on" "$work/edged.out" 2>/dev/null && break; sleep 0.1; done
grep -q "listening on" "$work/edged.out" || { cat "$work/edged.log" >&2; exit 1; }
export EDGECTL_IDENTITY="$work/.edged-dev/identity"

results=()
version=0
for loss in $losses; do
  port=$((7600 + ${loss%.*}))
  python3 "$root/scripts/udp-link.py" --listen "127.0.0.1:$port" --to 127.0.0.1:7443 \
    --rate-mbit "$rate" --delay-ms "$delay" --loss-pct "$loss" >/dev/null 2>"$work/link-$loss.log" &
  link=$!
  pids+=($link)
  sleep 0.5
  for cc in bbr cubic newreno; do
    version=$((version + 1))
    python3 "$work/gen.py" "$work/big.wasm" "$mb"
    # Compile off the measured link: the push reuses edgectl's compile cache.
    "$edgectl" build "$work/big.wasm" --target x86_64 -o "$work/build-$version" >/dev/null
    report=$("$edgectl" --json --node "127.0.0.1:$port" --congestion "$cc" push "$work/big.wasm" \
      --name "cc$version" --target x86_64)
    line=$(python3 -c 'import json, sys
r = json.loads(sys.argv[1]); rate = float(sys.argv[2]) * 1e6 / 8 / 1e6
print(sys.argv[3], sys.argv[4], r["sent_bytes"], "%.1f" % r["seconds"], "%.2f" % r["mb_per_s"], "%.2f" % (r["mb_per_s"] / rate))' \
      "$report" "$rate" "$cc" "$loss")
    echo "$line"
    results+=("$line")
  done
  kill "$link"; wait "$link" 2>/dev/null || true
done

mkdir -p "$root/bench/out"
printf '%s\n' "${results[@]}" | python3 -c 'import json, sys
rows = [dict(zip(["congestion", "loss_pct", "sent_bytes", "seconds", "mb_per_s", "of_line_rate"], l.split())) for l in sys.stdin]
json.dump({"rate_mbit": float(sys.argv[1]), "one_way_delay_ms": float(sys.argv[2]), "rows": rows}, open(sys.argv[3], "w"), indent=1)' \
  "$rate" "$delay" "$root/bench/out/congestion.json"
echo "wrote bench/out/congestion.json (columns: congestion, loss %, bytes sent, s, MB/s, fraction of the line rate)"
