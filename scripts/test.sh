#!/usr/bin/env bash
# The project's test command (README, CI). Installs what the tests need, idempotently, then runs
# the whole workspace's tests: unit tests, and end-to-end tests against real processes, real
# sockets and real guests built from guests/.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
scripts/install-wasm-targets.sh
scripts/install-test-deps.sh
scripts/build-guests.sh
# The aarch64 daemon the qemu end-to-end test runs (daemon/tests/aarch64.rs).
scripts/build-aarch64.sh --profile qemu-test
cargo test --workspace --locked "$@"
