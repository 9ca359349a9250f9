#!/usr/bin/env bash
# Cross-builds edged and edgectl for aarch64-unknown-linux-gnu on an x86_64 Debian machine.
# Installs what it needs, idempotently: the rustup target and Debian's gcc-aarch64-linux-gnu
# (the linker, configured in .cargo/config.toml) with the arm64 glibc sysroot.
#
# Usage: build-aarch64.sh [--profile PROFILE] [--bench]   (default profile: release)
# Output: <target dir>/aarch64-unknown-linux-gnu/<PROFILE>/{edged,edgectl} (and bench with
#   --bench), where <target dir> is target/ or CARGO_TARGET_DIR (scripts/target-dir.sh);
#   cargo names the dev profile's directory "debug"; --profile qemu-test is the unoptimized
#   build the end-to-end test runs under qemu-user.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
profile=release
packages=(-p edged -p edgectl)
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile="$2"; shift 2 ;;
    --bench) packages+=(-p bench); shift ;;
    *) echo "build-aarch64.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

"$root/scripts/install-wasm-targets.sh" aarch64-unknown-linux-gnu

missing=()
command -v aarch64-linux-gnu-gcc >/dev/null || missing+=(gcc-aarch64-linux-gnu)
[ -e /usr/aarch64-linux-gnu/lib/libc.so.6 ] || missing+=(libc6-dev-arm64-cross)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

cd "$root"
cargo build --locked --profile "$profile" --target aarch64-unknown-linux-gnu "${packages[@]}"
case "$profile" in
  dev | test) profile_dir=debug ;;
  bench) profile_dir=release ;;
  *) profile_dir=$profile ;;
esac
echo "built ${packages[*]} in $("$root/scripts/target-dir.sh")/aarch64-unknown-linux-gnu/$profile_dir/"
