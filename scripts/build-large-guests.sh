#!/usr/bin/env bash
# Builds the large (interpreter) guests from source: a Python hello with componentize-py and a
# JavaScript hello with componentize-js, both `wasi:http/proxy` components.
#   guests/large/python-hello/app.py -> guests/out/large/python-hello.wasm
#   guests/large/js-hello/app.js     -> guests/out/large/js-hello.wasm
# The tools come from PyPI and npm at pinned versions and live in a cache directory (a venv and an
# npm prefix under ${EDGED_CACHE:-~/.cache/edged}/large-guests), never system-wide.
#
# Idempotent and safe to re-run: a guest is rebuilt only when its source, the WIT, the WASI WIT
# edged links, or the tool version changed (a stamp next to the output records them), and outputs
# are renamed into place. Prints nothing but errors when everything is already built.
#
# Not part of scripts/test.sh on purpose: installing the tools is slow, and no test depends on
# these guests. The bench (large phase) and scripts/demo.sh use them.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py_version=0.25.1
js_version=0.23.0
cache="${EDGED_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edged}/large-guests"
src="$root/guests/large"
out="$root/guests/out/large"
mkdir -p "$cache" "$out"

# Run a noisy command; show its output only if it fails.
quiet() {
  local log
  log=$(mktemp "$cache/.log.XXXXXX")
  if ! "$@" >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    echo "build-large-guests: failed: $*" >&2
    return 1
  fi
  rm -f "$log"
}

# --- tools -----------------------------------------------------------------------------------
# A tool counts as installed only once its `.ok` marker exists, so an interrupted install is
# redone rather than trusted.
venv="$cache/py-$py_version"
if [ ! -f "$venv/.ok" ]; then
  command -v python3 >/dev/null || { echo "build-large-guests: python3 is needed for componentize-py" >&2; exit 1; }
  rm -rf "$venv"
  quiet python3 -m venv "$venv"
  quiet "$venv/bin/pip" install --disable-pip-version-check "componentize-py==$py_version"
  touch "$venv/.ok"
fi
npm_prefix="$cache/js-$js_version"
if [ ! -f "$npm_prefix/.ok" ]; then
  command -v npm >/dev/null || { echo "build-large-guests: npm (Node.js) is needed for componentize-js" >&2; exit 1; }
  rm -rf "$npm_prefix"
  mkdir -p "$npm_prefix"
  echo '{"private": true}' >"$npm_prefix/package.json"
  quiet npm install --prefix "$npm_prefix" --no-audit --no-fund --loglevel=error \
    "@bytecodealliance/componentize-js@$js_version"
  touch "$npm_prefix/.ok"
fi

# --- WIT ---------------------------------------------------------------------------------------
# The wasi:* WIT comes from the wasmtime-wasi-http crate the daemon is built with (Cargo.lock
# pins it), so the guests import the WASI version edged links; it is copied, not committed.
# `--filter-platform` keeps cargo to the crates this host builds (the build already fetched
# them): without it cargo needs every platform's crates in Cargo.lock, which a fresh cargo home
# does not hold (and an offline run then fails); with it, a missing crate is downloaded.
host_triple=$(rustc -vV | sed -n 's/^host: //p')
metadata_err=$(mktemp)
wasi_http_manifest=$(cd "$root" && cargo metadata --format-version 1 --locked --filter-platform "$host_triple" 2>"$metadata_err" |
  python3 -c 'import json, sys
m = json.load(sys.stdin)
print(next(p["manifest_path"] for p in m["packages"] if p["name"] == "wasmtime-wasi-http"))' 2>/dev/null) || {
  echo "build-large-guests: cannot find the wasmtime-wasi-http crate's WIT through cargo metadata:" >&2
  sed 's/^/  /' "$metadata_err" >&2
  echo "  (it needs the crates of $host_triple: build edged first, or run cargo fetch with network)" >&2
  rm -f "$metadata_err"
  exit 1
}
rm -f "$metadata_err"
wasi_wit="$(dirname "$wasi_http_manifest")/wit/deps"
wit="$cache/wit"
if ! diff -rq "$wasi_wit" "$wit/deps" >/dev/null 2>&1 || ! cmp -s "$src/wit/world.wit" "$wit/world.wit"; then
  rm -rf "$wit.tmp"
  mkdir -p "$wit.tmp"
  cp -r "$wasi_wit" "$wit.tmp/deps"
  cp "$src/wit/world.wit" "$wit.tmp/world.wit"
  cat "$wit.tmp/world.wit" "$wit.tmp"/deps/*.wit | sha256sum >"$wit.tmp/.sum"
  rm -rf "$wit"
  mv "$wit.tmp" "$wit"
fi

# componentize-js's engine (StarlingMonkey) is built against wasi:*@0.2.10 and only finds its
# fetch-event handler under that exact name, so its guest gets the same WIT relabelled 0.2.10
# (0.2.12 only adds `exit-with-code`, which 0.2.10 had as unstable: it is marked so again).
# edged links both versions: wasmtime's linker serves any 0.2.x import from its 0.2 host.
js_wasi=0.2.10
wit_js="$cache/wit-js-$js_wasi"
if ! cmp -s "$wit/.sum" "$wit_js/.sum" 2>/dev/null; then
  rm -rf "$wit_js.tmp"
  cp -r "$wit" "$wit_js.tmp"
  sed -i -e "s/@0\.2\.12/@$js_wasi/g" \
    -e 's/@since(version = 0\.2\.12)/@unstable(feature = cli-exit-with-code)/' "$wit_js.tmp"/*.wit "$wit_js.tmp"/deps/*.wit
  rm -rf "$wit_js"
  mv "$wit_js.tmp" "$wit_js"
fi

# --- guests ------------------------------------------------------------------------------------
build_python() { # OUT
  (cd "$src/python-hello" && "$venv/bin/componentize-py" -q -d "$wit" -w hello componentize app -o "$1")
}
build_js() { # OUT
  "$npm_prefix/node_modules/.bin/componentize-js" --wit "$wit_js" --world-name hello \
    "$src/js-hello/app.js" -o "$1"
}

# build NAME BUILDER INPUTS...: run BUILDER into a temp file and rename it to $out/NAME.wasm,
# unless the stamp of the inputs and tool versions matches the one recorded last time.
build() {
  local name=$1 builder=$2 want tmp
  shift 2
  want="$py_version $js_version $(cat "$@" | sha256sum | cut -d' ' -f1)"
  if [ -f "$out/$name.wasm" ] && [ "$(cat "$out/.$name.stamp" 2>/dev/null)" = "$want" ]; then
    return 0
  fi
  tmp=$(mktemp "$out/.$name.XXXXXX.wasm")
  if ! quiet "$builder" "$tmp"; then
    rm -f "$tmp"
    return 1
  fi
  chmod 644 "$tmp"
  mv -f "$tmp" "$out/$name.wasm"
  echo "$want" >"$out/.$name.stamp"
}

wit_files=("$wit/world.wit" "$wit"/deps/*.wit)
build python-hello build_python "$src/python-hello/app.py" "${wit_files[@]}"
build js-hello build_js "$src/js-hello/app.js" "$wit_js/world.wit" "$wit_js"/deps/*.wit
