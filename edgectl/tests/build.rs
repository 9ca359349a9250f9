//! `edgectl build` as an operator runs it: a real process, real guest, real files.

use std::path::Path;
use std::process::Command;

use edged_artifacts::Manifest;
use edged_testkit::guest;

/// `edgectl ARGS` with its compile cache in `cache` (never the user's).
fn edgectl_cached(cache: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_edgectl"))
        .env("EDGECTL_CACHE_DIR", cache)
        .args(args)
        .output()
        .expect("edgectl runs")
}

/// `edgectl --no-cache ARGS`.
fn edgectl(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_edgectl"))
        .arg("--no-cache")
        .args(args)
        .output()
        .expect("edgectl runs")
}

#[test]
fn build_writes_both_targets_deterministically() {
    let input = guest("init-heavy-p1.wasm");
    let cache = tempfile::tempdir().unwrap();
    let first = tempfile::tempdir().unwrap();
    let second = tempfile::tempdir().unwrap();
    let third = tempfile::tempdir().unwrap();
    // Two real compiles (the first without the cache, the second filling it), then one from the
    // cache: all three byte-identical.
    for (out, expect) in [
        (first.path(), ""),
        (second.path(), "compiled"),
        (third.path(), "cached"),
    ] {
        let args = [
            "build",
            input.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ];
        let output = if expect.is_empty() {
            edgectl(&args)
        } else {
            edgectl_cached(cache.path(), &args)
        };
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            stdout.contains("pre-initialized with `wizer-initialize`"),
            "{stdout}"
        );
        assert!(stdout.contains("x86_64-unknown-linux-gnu"), "{stdout}");
        assert!(stdout.contains("aarch64-unknown-linux-gnu"), "{stdout}");
        assert!(stdout.contains("wizer (wizer-initialize)"), "{stdout}");
        assert!(stdout.contains("aot aarch64-unknown-linux-gnu"), "{stdout}");
        let steps: Vec<&str> = stdout
            .lines()
            .skip_while(|l| !l.contains("steps:"))
            .skip(1)
            .take_while(|l| l.contains(" ms"))
            .collect();
        assert_eq!(steps.len(), 4, "{stdout}");
        for step in steps {
            let expect = if expect.is_empty() { " ms" } else { expect };
            assert!(step.ends_with(expect), "{step}");
        }
    }
    let manifest: Manifest =
        serde_json::from_slice(&std::fs::read(first.path().join("manifest.json")).unwrap())
            .unwrap();
    assert_eq!(manifest.name, "init-heavy-p1");
    assert_eq!(manifest.artifacts.len(), 2);
    for a in &manifest.artifacts {
        let file = format!("{}.cwasm", a.target);
        let bytes = std::fs::read(first.path().join(&file)).unwrap();
        assert_eq!(edged_compiler::content_hash(&bytes), a.blake3);
        assert_eq!(bytes.len() as u64, a.size);
        for other in [second.path(), third.path()] {
            assert!(
                bytes == std::fs::read(other.join(&file)).unwrap(),
                "{file} differs between two builds"
            );
        }
    }
    let source = std::fs::read(first.path().join("source.wasm")).unwrap();
    assert_eq!(source, std::fs::read(&input).unwrap());
}

#[test]
fn build_refuses_invalid_input_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.wasm");
    std::fs::write(&bad, [0u8, b'a', b's', b'm', 1, 0, 0, 0, 3, 2, 1, 7]).unwrap();
    let output = edgectl(&[
        "build",
        bad.to_str().unwrap(),
        "-o",
        dir.path().join("out").to_str().unwrap(),
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("invalid core module"), "{stderr}");
    assert!(stderr.contains("offset"), "{stderr}");
    assert!(!dir.path().join("out/manifest.json").exists());

    let output = edgectl(&[
        "build",
        guest("init-calls-import.wat").to_str().unwrap(),
        "-o",
        dir.path().join("out").to_str().unwrap(),
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("called import `wasi_snapshot_preview1::random_get`"),
        "{stderr}"
    );
}
