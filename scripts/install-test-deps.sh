#!/usr/bin/env bash
# Debian packages the tests need, installed only if missing (idempotent):
#   systemd — for `systemd-analyze verify` of the unit file;
#   qemu-user-static — runs the cross-built aarch64 edged in the aarch64 end-to-end test;
#   docker-registry — the CNCF distribution registry the OCI registry tests publish to and pull
#   from (started by the tests themselves on a free loopback port; its packaged service is not
#   used).
set -euo pipefail
missing=()
command -v systemd-analyze >/dev/null || missing+=(systemd)
command -v qemu-aarch64-static >/dev/null || missing+=(qemu-user-static)
[ -x /usr/bin/docker-registry ] || missing+=(docker-registry)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
