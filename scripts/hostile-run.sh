#!/usr/bin/env bash
# A hostile run against release binaries: a real edged on loopback (dev identity), fed inputs an
# attacker or a careless operator would send. Prints each case and what the node answered, then
# checks the node still serves what it held. Not part of the test command (the end-to-end tests
# in daemon/tests/hardening.rs hold the same behaviour); run it by hand after changing the
# daemon: scripts/hostile-run.sh
set -uo pipefail
# Messages, not backtraces: the binaries' errors are what an operator reads.
export RUST_BACKTRACE=0 RUST_LIB_BACKTRACE=0
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
cargo build --release --locked -q -p edged -p edgectl
scripts/build-guests.sh >/dev/null
edged="$target_dir/release/edged"
edgectl="$target_dir/release/edgectl"
work=$(mktemp -d)
trap 'kill $pid 2>/dev/null; rm -rf "$work"' EXIT

cat > "$work/edged.toml" <<TOML
[node]
state_dir = "state"
http_listen = "127.0.0.1:0"
head_timeout_ms = 1000
body_timeout_ms = 1000

[control]
listen = "127.0.0.1:0"
identity_dir = "identity"
trusted_keys = ["identity/signing.pub"]
dev_identity = true

[[function]]
name = "hello"
wasm = "$root/guests/out/hello-http.wasm"
route = "/hello"
[function.limits]
max_concurrency = 2
TOML
"$edged" --config "$work/edged.toml" > "$work/out" 2> "$work/log" &
pid=$!
for _ in $(seq 1 300); do grep -q "listening on" "$work/out" && break; sleep 0.1; done
http=$(sed -n 's/^edged listening on http:\/\///p' "$work/out")
quic=$(sed -n 's/^edged control on quic:\/\///p' "$work/out")
export EDGECTL_IDENTITY="$work/identity" EDGECTL_NODE="$quic"
host=${http%:*}; port=${http##*:}

case_() { printf '\n== %s\n' "$1"; }
push() { "$edgectl" push "$@" --target x86_64 2>&1 | tail -n 2; }

case_ "a good push (baseline)"
push guests/out/hello-http.wasm --name app
curl -sS "http://$http/app/ok"

case_ "random bytes as wasm"
head -c 4096 /dev/urandom > "$work/random.wasm"; push "$work/random.wasm" --name app
case_ "a truncated component"
head -c 20000 guests/out/hello-http.wasm > "$work/truncated.wasm"; push "$work/truncated.wasm" --name app
case_ "an unresolvable import"
echo '(module (import "env" "launch_missiles" (func)) (memory (export "memory") 1) (func (export "_start")))' > "$work/missile.wat"
push "$work/missile.wat" --name app
case_ "an empty component"
echo '(component)' > "$work/empty.wat"; push "$work/empty.wat" --name app
case_ "a memory the pool cannot hold"
echo '(module (memory (export "memory") 65536) (func (export "_start")))' > "$work/greedy.wat"; push "$work/greedy.wat" --name app
for route in "" noslash /metrics /hello; do
  case_ "a pushed route \"$route\""
  push guests/out/hello-http.wasm --name other --route "$route"
done
case_ "activating a version that cannot be served"
"$edgectl" activate app@3 2>&1 | tail -n 1
case_ "HTTP/1.0 without Host"
printf 'GET /hello/old HTTP/1.0\r\n\r\n' | timeout 5 bash -c "exec 3<>/dev/tcp/$host/$port; cat >&3; cat <&3" | sed -n '1p;$p'
case_ "HTTP/1.1 without Host"
printf 'GET /hello HTTP/1.1\r\nConnection: close\r\n\r\n' | timeout 5 bash -c "exec 3<>/dev/tcp/$host/$port; cat >&3; cat <&3" | sed -n '1p;$p'
# Prints the first line the node sends on a connection fed `$1` and then kept open, with the
# time it took (or when the node closed the connection without a word).
stall() {
  local start; start=$(date +%s%N)
  { printf "$1"; sleep 5; } | timeout 6 bash -c "exec 3<>/dev/tcp/$host/$port; cat >&3 & cat <&3" | {
    if IFS= read -r line; then echo "after $(( ($(date +%s%N) - start) / 1000000 )) ms: $line"
    else echo "closed by the node after $(( ($(date +%s%N) - start) / 1000000 )) ms"; fi
    cat >/dev/null
  }
}
case_ "a body that never finishes (body_timeout_ms = 1000)"
stall 'POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nten bytes.'
case_ "a head that stops half-way (head_timeout_ms = 1000)"
stall 'GET /hello HTTP/1.1\r\nHost: x\r\nX-Slow: '
case_ "a bad config line (check-config)"
printf '[node]\nhttp_listen = "127.0.0.1:0"\ndrain_timeout_ms = "soon"\n' > "$work/bad.toml"
"$edged" check-config "$work/bad.toml" 2>&1
case_ "garbage on the QUIC port"
head -c 1200 /dev/urandom > "$work/garbage"; timeout 2 bash -c "cat '$work/garbage' > /dev/udp/${quic%:*}/${quic##*:}" && echo "sent 1200 random bytes"

case_ "afterwards: the node still serves what it held"
curl -sS -w '   (HTTP %{http_code})\n' "http://$http/app/still"
curl -sS -w '   (HTTP %{http_code})\n' "http://$http/hello/still"
"$edgectl" ls
echo
echo "node log, warnings and errors:"
grep -E "WARN|ERROR" "$work/log" | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-220 | tail -n 20
