//! # edged-testkit
//!
//! Helpers shared by edged's tests and bench: building the sample guests in `guests/` from
//! source (through `scripts/build-guests.sh`, once per process) and finding the workspace.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// The workspace root (where `Cargo.toml`, `guests/` and `scripts/` live).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit sits one level below the workspace root")
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
