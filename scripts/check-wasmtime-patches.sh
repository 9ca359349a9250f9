#!/usr/bin/env bash
# Says whether the crates index has the wasmtime releases that fix the advisories in
# docs/advisories.md (48.0.9, 48.0.10, 48.0.11), for every wasmtime crate edged pins, and so
# whether the `=48.0.8` pin in Cargo.toml can move. Exits 0 either way: it informs, it does not
# gate. Needs network access to the index (`cargo info` asks it).
set -u

cd "$(dirname "$0")/.."
crates=(wasmtime wasmtime-wasi wasmtime-wasi-http wasmtime-wizer)
versions=(48.0.11 48.0.10 48.0.9)
pinned=$(sed -n 's/^wasmtime = { version = "=\([0-9.]*\)".*/\1/p' Cargo.toml)
echo "pinned now: wasmtime =${pinned:-?} (Cargo.toml)"

newest_all=""
for v in "${versions[@]}"; do
    missing=()
    for c in "${crates[@]}"; do
        # `cargo info` fails for a version the index does not have; a network failure also
        # lands here, and is told apart by its message.
        if out=$(timeout 60 cargo info --registry crates-io "$c@$v" 2>&1); then
            echo "  $c@$v: in the index"
        else
            reason=$(printf '%s\n' "$out" | grep -m1 -iE 'error|could not|failed' || echo "no answer")
            echo "  $c@$v: NOT available ($reason)"
            missing+=("$c")
        fi
    done
    if [ ${#missing[@]} -eq 0 ]; then
        newest_all=$v
        break
    fi
done

if [ -n "$newest_all" ]; then
    echo "RESULT: the pin CAN move: every pinned crate has $newest_all."
    echo "  Set version = \"=$newest_all\" for ${crates[*]} in Cargo.toml, run"
    echo "  'cargo update -p wasmtime', rebuild, and mark the rows of docs/advisories.md fixed."
else
    echo "RESULT: the pin CANNOT move yet: no release in ${versions[*]} is in the index for all of"
    echo "  ${crates[*]}. Keep the mitigations in docs/advisories.md in place."
fi
exit 0
