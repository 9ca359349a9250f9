#!/usr/bin/env bash
# Installs edged as a systemd service on a Debian-like box. Idempotent: re-running upgrades the
# binary and unit, never touches an existing config or the store.
#
#   sudo scripts/install.sh [--binary PATH]      install or upgrade, enable and (re)start
#   sudo scripts/install.sh --uninstall          remove binary and unit; keep config and store
#   sudo scripts/install.sh --uninstall --purge  also remove /etc/edged, /var/lib/edged, the user
#
# DESTDIR=dir stages the files under dir instead (no user, no systemctl): used for packaging
# and by the tests.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dest=${DESTDIR:-}
binary=""
action=install
purge=no
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary=$2; shift 2 ;;
    --uninstall) action=uninstall; shift ;;
    --purge) purge=yes; shift ;;
    *) echo "install.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

live() { [ -z "$dest" ] && [ -d /run/systemd/system ]; }

if [ "$action" = uninstall ]; then
  if live; then systemctl disable --now edged.service 2>/dev/null || true; fi
  rm -f "$dest/usr/bin/edged" "$dest/lib/systemd/system/edged.service"
  rm -rf "$dest/usr/share/doc/edged"
  if live; then systemctl daemon-reload; fi
  if [ "$purge" = yes ]; then
    rm -rf "$dest/etc/edged" "$dest/var/lib/edged"
    if [ -z "$dest" ] && getent passwd edged >/dev/null; then userdel edged; fi
    echo "edged removed, with its config and store"
  else
    echo "edged removed; config in /etc/edged and store in /var/lib/edged kept (--purge removes them)"
  fi
  exit 0
fi

if [ -z "$binary" ]; then
  # Where cargo builds (target/, or CARGO_TARGET_DIR). sudo drops both cargo from PATH and
  # CARGO_TARGET_DIR from the environment; then only target/ can be guessed, and --binary says
  # where the binary really is.
  target="$root/target"
  if command -v cargo >/dev/null; then
    target=$("$root/scripts/target-dir.sh")
  fi
  binary="$target/release/edged"
fi
if [ ! -x "$binary" ]; then
  echo "install.sh: no edged binary at $binary (cargo build --release -p edged, or --binary PATH;" \
    "under sudo CARGO_TARGET_DIR is not seen)" >&2
  exit 1
fi
"$binary" --version >/dev/null

install -d -m 0755 "$dest/usr/bin" "$dest/lib/systemd/system" "$dest/usr/share/doc/edged"
install -m 0755 "$binary" "$dest/usr/bin/edged.new"
mv -f "$dest/usr/bin/edged.new" "$dest/usr/bin/edged"
install -m 0644 "$root/scripts/systemd/edged.service" "$dest/lib/systemd/system/edged.service"
install -m 0644 "$root/README.md" "$root/node-config/edged.example.toml" "$dest/usr/share/doc/edged/"
install -d -m 0755 "$dest/etc/edged"
if [ ! -e "$dest/etc/edged/edged.toml" ]; then
  install -m 0644 "$root/scripts/systemd/edged.toml" "$dest/etc/edged/edged.toml"
fi
# A staged config's paths (state_dir, identity) are the target machine's, not this one's, so
# under DESTDIR only its syntax and values are checked. The unit's ExecStartPre runs the full
# check as the service user on the box itself.
check_args=()
[ -z "$dest" ] || check_args=(--no-files)
"$dest/usr/bin/edged" check-config "${check_args[@]}" "$dest/etc/edged/edged.toml"

if [ -z "$dest" ]; then
  if ! getent passwd edged >/dev/null; then
    useradd --system --user-group --home-dir /var/lib/edged --no-create-home \
      --shell /usr/sbin/nologin edged
  fi
fi
if live; then
  systemctl daemon-reload
  systemctl enable edged.service
  systemctl restart edged.service
  systemctl --no-pager --lines=0 status edged.service || true
else
  echo "files installed under ${dest:-/}; systemd is not running here, so the service was not started"
fi
