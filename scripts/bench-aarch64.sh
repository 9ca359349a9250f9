#!/usr/bin/env bash
# Runs the bench for aarch64 under qemu-user on an x86_64 machine: cross-builds edged and the
# bench (release), then runs both emulated. The figures are informative only (the bench says so
# in its output and JSON): emulation tells nothing about real aarch64 hardware. On an aarch64
# box, build natively and run <target dir>/release/bench instead.
#
# Usage: bench-aarch64.sh [bench arguments...]   (results in bench/out-aarch64/)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
scripts/install-test-deps.sh
scripts/build-guests.sh
scripts/build-aarch64.sh --bench
qemu=(qemu-aarch64-static -L /usr/aarch64-linux-gnu)
dir="$(scripts/target-dir.sh)/aarch64-unknown-linux-gnu/release"
# A small pool: qemu-user keeps bookkeeping per reserved guest page (README, aarch64).
exec "${qemu[@]}" "$dir/bench" \
  --edged "$dir/edged" --emulator "${qemu[*]}" --pool-slots 16 \
  --iterations 200 --load-iterations 10 --baseline-iterations 3 --requests 1000 \
  --out bench/out-aarch64 "$@"
