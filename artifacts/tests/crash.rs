//! Crash consistency: a child process hammers the store with puts, manifests, activations,
//! removals and gc, and is killed with SIGKILL at many different moments. After every kill the
//! store must open, verify clean, and every indexed manifest must be fully readable.

use std::process::{Command, Stdio};
use std::time::Duration;

use edged_artifacts::{ArtifactRef, BlobKind, BlobRef, Manifest, Store};
use edged_compiler::Target;

const CHILD_ENV: &str = "EDGED_CRASH_CHILD_STORE";

/// A WAT source that differs per `seq`, with a data segment large enough that writes take a
/// moment (so kills land inside them too).
fn source_for(seq: u64) -> Vec<u8> {
    let filler = "x".repeat(((seq % 7) as usize + 1) * 40_000);
    format!(r#"(module (memory 1) (data (i32.const 0) "{seq} {filler}"))"#).into_bytes()
}

/// Something that passes the store's structural artifact checks: an ELF header for x86_64 with
/// an empty section table, padded to vary in size.
fn fake_artifact_for(seq: u64) -> Vec<u8> {
    let mut bytes = vec![0u8; 64 + 200_000 + (seq as usize % 5) * 100_000];
    bytes[..4].copy_from_slice(b"\x7fELF");
    bytes[4] = 2;
    bytes[5] = 1;
    bytes[18..20].copy_from_slice(&62u16.to_le_bytes());
    bytes[64..72].copy_from_slice(&seq.to_le_bytes());
    bytes
}

/// The child: mutate the store until killed.
fn churn(dir: &str) -> ! {
    let store = Store::open(dir).unwrap();
    // Versions must keep increasing across kills; the newest manifest is always active, so
    // it survives removals.
    let start = store
        .manifests()
        .unwrap()
        .iter()
        .map(|m| m.version)
        .max()
        .unwrap_or(0);
    for seq in start.. {
        let name = format!("app{}", seq % 3);
        let source = wat::parse_bytes(&source_for(seq)).unwrap().into_owned();
        let source_hash = store.put_blob(&source, BlobKind::Source, None).unwrap();
        let artifact = fake_artifact_for(seq);
        let kind = BlobKind::Artifact {
            target: Target::X86_64Linux,
            fingerprint: "crash-test".into(),
        };
        let artifact_hash = store.put_blob(&artifact, kind, None).unwrap();
        let version = seq + 1;
        let manifest = Manifest {
            source: BlobRef {
                blake3: source_hash,
                size: source.len() as u64,
            },
            artifacts: vec![ArtifactRef {
                target: Target::X86_64Linux,
                fingerprint: "crash-test".into(),
                blake3: artifact_hash,
                size: artifact.len() as u64,
            }],
            ..Manifest::sample(&name, version)
        };
        store.put_manifest(&manifest).unwrap();
        store.activate(&name, version).unwrap();
        if seq % 4 == 3 {
            for old in store.manifests().unwrap() {
                if store.active_version(&old.name).unwrap() != Some(old.version) {
                    store.remove_manifest(&old.name, old.version).unwrap();
                }
            }
            store.gc(Duration::ZERO).unwrap();
        }
    }
    unreachable!()
}

#[test]
fn crash_child() {
    // Only does anything when started by `store_survives_sigkill_at_any_point`.
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        churn(&dir);
    }
}

#[test]
fn store_survives_sigkill_at_any_point() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut saw_progress = false;
    for round in 0..40 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let delay = Duration::from_millis(30 + rng % 400);
        let mut child = Command::new(&exe)
            .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        // `kill` is SIGKILL on Unix: no destructors, no flush, mid-write.
        let _ = child.kill();
        let output = child.wait_with_output().unwrap();
        assert!(
            !output.status.success(),
            "round {round}: child exited on its own: {}",
            String::from_utf8_lossy(&output.stderr)
        );

        let store = Store::open(dir.path())
            .unwrap_or_else(|e| panic!("round {round}: store does not open after SIGKILL: {e}"));
        let report = store.verify().unwrap();
        assert!(
            report.is_ok(),
            "round {round} (killed after {delay:?}): {:?}",
            report.problems
        );
        for manifest in store.manifests().unwrap() {
            for hash in manifest.blob_hashes() {
                store.read_blob(hash).unwrap_or_else(|e| {
                    panic!(
                        "round {round}: manifest {} blob unreadable: {e}",
                        manifest.id()
                    )
                });
            }
            saw_progress = true;
        }
        for name in ["app0", "app1", "app2"] {
            if let Some(version) = store.active_version(name).unwrap() {
                assert!(store.manifest(name, version).unwrap().is_some());
            }
        }
    }
    assert!(
        saw_progress,
        "the child never got a manifest in; the test proved nothing"
    );
}
