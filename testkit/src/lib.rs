//! # edged-testkit
//!
//! Helpers shared by edged's tests and bench: building the sample guests in `guests/` from
//! source (through `scripts/build-guests.sh`, once per process), finding the workspace, and
//! generating large modules for transfer tests and benches.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// The workspace root (where `Cargo.toml`, `guests/` and `scripts/` live).
///
/// Read from the running test's `CARGO_MANIFEST_DIR` (every workspace member sits one level
/// below the root) before the one compiled in: cargo reuses a built testkit for a clone of the
/// workspace elsewhere that shares the target directory, and the compiled-in path then names
/// the other clone.
pub fn workspace_root() -> PathBuf {
    let member = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    member
        .parent()
        .expect("workspace members sit one level below the workspace root")
        .to_path_buf()
}

/// Path of a built guest, e.g. `guest("init-heavy-p1.wasm")` or `guest("trap.wat")`. Builds
/// all guests on first use; panics with the script's output if that fails.
pub fn guest(file: &str) -> PathBuf {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let script = workspace_root().join("scripts/build-guests.sh");
        let output = Command::new("bash")
            .arg(&script)
            .output()
            .map_err(|e| format!("running {}: {e}", script.display()))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{} failed:\n{}{}",
                script.display(),
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ))
        }
    });
    if let Err(e) = built {
        panic!("{e}");
    }
    let path = workspace_root().join("guests/out").join(file);
    assert!(path.exists(), "no guest {file} at {}", path.display());
    path
}

/// The bytes of a built guest.
pub fn guest_bytes(file: &str) -> Vec<u8> {
    std::fs::read(guest(file)).expect("guest is readable")
}

/// A binary of this workspace, built in the same profile as the running test (built on demand
/// when the test was run on its own, e.g. `cargo test -p edged`). For binaries of *another*
/// package; a package's own binaries are `env!("CARGO_BIN_EXE_<name>")`.
pub fn workspace_binary(name: &str) -> PathBuf {
    static BUILD: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("tests run from target/<profile>/deps");
    let path = profile_dir.join(name);
    let _guard = BUILD.lock().unwrap_or_else(|p| p.into_inner());
    if !path.exists() {
        let mut cargo = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cargo
            .current_dir(workspace_root())
            .args(["build", "--bin", name]);
        if profile_dir.file_name().is_some_and(|p| p == "release") {
            cargo.arg("--release");
        }
        let status = cargo.status().expect("cargo runs");
        assert!(status.success(), "building {name} failed");
    }
    path
}

/// A core module with one `size`-byte data segment of pseudo-random bytes: a large artifact.
pub fn big_module(size: usize, seed: u64) -> Vec<u8> {
    fn leb(mut n: u64, out: &mut Vec<u8>) {
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    let pages = (size as u64).div_ceil(65536) + 1;
    let mut wasm = b"\0asm\x01\0\0\0".to_vec();
    // type 0 = [] -> []; func 0 of type 0
    wasm.extend([1, 4, 1, 0x60, 0, 0]);
    wasm.extend([3, 2, 1, 0]);
    let mut memory = vec![1, 0];
    leb(pages, &mut memory);
    wasm.push(5);
    leb(memory.len() as u64, &mut wasm);
    wasm.extend(memory);
    // export "_start" = func 0; its body does nothing
    wasm.extend([7, 10, 1, 6]);
    wasm.extend(b"_start");
    wasm.extend([0, 0]);
    wasm.extend([10, 4, 1, 2, 0, 0x0b]);
    let mut data = vec![1, 0, 0x41, 0, 0x0b];
    leb(size as u64, &mut data);
    let mut x = seed | 1;
    data.extend((0..size).map(|_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x as u8
    }));
    wasm.push(11);
    leb(data.len() as u64, &mut wasm);
    wasm.extend(data);
    wasm
}
