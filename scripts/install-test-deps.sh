#!/usr/bin/env bash
# Debian packages the tests need, installed only if missing (idempotent):
#   systemd — for `systemd-analyze verify` of the unit file.
set -euo pipefail
missing=()
command -v systemd-analyze >/dev/null || missing+=(systemd)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
