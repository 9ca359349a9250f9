//! The store on disk: atomic puts, manifests, activation, gc, verify, and refusals that leave
//! everything else as it was.

use std::time::Duration;

use edged_compiler::{CompileOptions, Target, compile};
use edged_snapshots::{BlobKind, Manifest, Partial, Store, StoreError};
use edged_testkit::guest_bytes;

/// Compiles the init-heavy guest and stores it as `name@version`.
fn deploy(store: &Store, name: &str, version: u64) -> Manifest {
    let compiled = compile(
        &guest_bytes("init-heavy-p1.wasm"),
        &CompileOptions::default(),
    )
    .unwrap();
    store_compiled(store, name, version, &compiled)
}

fn store_compiled(
    store: &Store,
    name: &str,
    version: u64,
    compiled: &edged_compiler::Compiled,
) -> Manifest {
    let manifest = Manifest::from_compiled(name, version, 0, compiled);
    store.put_compiled(compiled, &manifest).unwrap();
    manifest
}

fn artifact_kind(manifest: &Manifest, target: Target) -> BlobKind {
    let a = manifest
        .artifacts
        .iter()
        .find(|a| a.target == target)
        .unwrap();
    BlobKind::Artifact {
        target,
        fingerprint: a.fingerprint.clone(),
    }
}

#[test]
fn put_get_activate_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = {
        let store = Store::open(dir.path()).unwrap();
        let m = deploy(&store, "app", 1);
        store.activate("app", 1).unwrap();
        m
    };
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(
        store.active_manifest("app").unwrap(),
        Some(manifest.clone())
    );
    for hash in manifest.blob_hashes() {
        let bytes = store.read_blob(hash).unwrap();
        assert_eq!(edged_compiler::content_hash(&bytes), hash);
        assert!(
            store
                .blob_path(hash)
                .starts_with(dir.path().join("blobs").join(&hash[..2]))
        );
    }
    let report = store.verify().unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
    assert_eq!(report.blobs_checked, 3);
    assert_eq!(report.manifests_checked, 1);
}

#[test]
fn manifest_needs_its_blobs_and_versions_are_immutable() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let compiled = compile(&guest_bytes("trap.wat"), &CompileOptions::default()).unwrap();
    let manifest = Manifest::from_compiled("trap", 1, 0, &compiled);
    let err = store.put_manifest(&manifest).unwrap_err();
    assert!(err.to_string().contains("is not stored"), "{err}");
    assert!(store.manifests().unwrap().is_empty());

    let stored = store_compiled(&store, "trap", 1, &compiled);
    let mut changed = stored.clone();
    changed.created_at += 1;
    let err = store.put_manifest(&changed).unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err}");
    // Re-putting the identical manifest is fine (a retried push).
    store.put_manifest(&stored).unwrap();
    assert!(store.activate("trap", 2).is_err());
}

#[test]
fn refusals_leave_the_store_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let manifest = deploy(&store, "app", 1);
    store.activate("app", 1).unwrap();
    let x86 = manifest
        .artifacts
        .iter()
        .find(|a| a.target == Target::X86_64Linux)
        .unwrap();
    let arm = manifest
        .artifacts
        .iter()
        .find(|a| a.target == Target::Aarch64Linux)
        .unwrap();
    let x86_bytes = store.read_blob(&x86.blake3).unwrap();
    let arm_bytes = store.read_blob(&arm.blake3).unwrap();

    // Random bytes as an artifact.
    let err = store
        .put_blob(
            &[0x5A; 4096],
            artifact_kind(&manifest, Target::X86_64Linux),
            None,
        )
        .unwrap_err();
    assert!(err.to_string().contains("no ELF header"), "{err}");

    // A truncated artifact.
    let truncated = &x86_bytes[..x86_bytes.len() / 2];
    let err = store
        .put_blob(
            truncated,
            artifact_kind(&manifest, Target::X86_64Linux),
            None,
        )
        .unwrap_err();
    assert!(err.to_string().contains("truncated"), "{err}");

    // The aarch64 artifact claiming to be for x86_64.
    let err = store
        .put_blob(
            &arm_bytes,
            artifact_kind(&manifest, Target::X86_64Linux),
            None,
        )
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("compiled for aarch64, not for x86_64"),
        "{err}"
    );

    // Bytes that do not match the hash they were announced with.
    let mut flipped = x86_bytes.clone();
    flipped[1000] ^= 1;
    let err = store
        .put_blob(
            &flipped,
            artifact_kind(&manifest, Target::X86_64Linux),
            Some(&x86.blake3),
        )
        .unwrap_err();
    assert!(matches!(err, StoreError::HashMismatch { .. }), "{err}");

    // Not Wasm as a source.
    let err = store
        .put_blob(b"#!/bin/sh\nrm -rf /\n", BlobKind::Source, None)
        .unwrap_err();
    assert!(err.to_string().contains("not WebAssembly"), "{err}");

    let report = store.verify().unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
    assert!(report.stray_files.is_empty(), "{:?}", report.stray_files);
    assert_eq!(report.blobs_checked, 3);
    assert_eq!(store.read_blob(&x86.blake3).unwrap(), x86_bytes);
    assert_eq!(store.active_manifest("app").unwrap(), Some(manifest));
    assert_eq!(
        std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
        0
    );
}

#[test]
fn corruption_on_disk_is_reported_and_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let manifest = deploy(&store, "app", 1);
    let x86 = &manifest.artifacts[0];
    let path = store.blob_path(&x86.blake3);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[4096] ^= 0xFF;
    std::fs::write(&path, &bytes).unwrap();

    let err = store.read_blob(&x86.blake3).unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("content hashes to"), "{err}");
    let report = store.verify().unwrap();
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    assert!(report.problems[0].contains(&x86.blake3));
    // The other blobs are intact.
    store.read_blob(&manifest.source.blake3).unwrap();
    store.read_blob(&manifest.artifacts[1].blake3).unwrap();
}

#[test]
fn gc_removes_only_unreferenced_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let v1 = deploy(&store, "app", 1);
    let trap = compile(&guest_bytes("trap.wat"), &CompileOptions::default()).unwrap();
    let v2 = store_compiled(&store, "app", 2, &trap);
    store.activate("app", 2).unwrap();
    // A blob with no manifest, as an interrupted push leaves behind.
    let orphan = compile(
        &guest_bytes("infinite-loop.wat"),
        &CompileOptions::default(),
    )
    .unwrap();
    let orphan_hash = store
        .put_blob(&orphan.source, BlobKind::Source, None)
        .unwrap();
    // A stray file, as a crash between rename and index leaves behind.
    let stray = store.blob_path(&"ab".repeat(32));
    std::fs::create_dir_all(stray.parent().unwrap()).unwrap();
    std::fs::write(&stray, b"stray").unwrap();
    assert_eq!(store.verify().unwrap().stray_files, vec![stray.clone()]);

    // Young blobs survive: they may belong to a push still in flight.
    let report = store.gc(Duration::from_secs(3600)).unwrap();
    assert!(report.blobs_removed.is_empty());
    assert!(store.blob_meta(&orphan_hash).unwrap().is_some());

    let report = store.gc(Duration::ZERO).unwrap();
    assert_eq!(report.blobs_removed, vec![orphan_hash.clone()]);
    assert_eq!(report.stray_files_removed, 1);
    assert!(!store.blob_path(&orphan_hash).exists());

    store.remove_manifest("app", 1).unwrap();
    assert!(
        store.remove_manifest("app", 2).is_err(),
        "active version must stay"
    );
    let report = store.gc(Duration::ZERO).unwrap();
    assert_eq!(report.blobs_removed.len(), 3);
    for hash in v1.blob_hashes() {
        assert!(!store.blob_path(hash).exists());
    }
    for hash in v2.blob_hashes() {
        store.read_blob(hash).unwrap();
    }
    let verify = store.verify().unwrap();
    assert!(
        verify.is_ok() && verify.stray_files.is_empty(),
        "{verify:?}"
    );
}

#[test]
fn adopting_an_uploaded_file_checks_it_and_moves_it_into_place() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let source = guest_bytes("hello-http.wasm");
    let hash = edged_compiler::content_hash(&source);
    let upload = store.partial_path(Partial::PushUpload(&hash));

    // Bytes that do not hash to the expected name: refused, the file removed, nothing indexed.
    let mut flipped = source.clone();
    flipped[source.len() / 2] ^= 0x40;
    std::fs::write(&upload, &flipped).unwrap();
    let err = store
        .adopt_blob_file(&upload, BlobKind::Source, &hash)
        .unwrap_err();
    assert!(matches!(err, StoreError::HashMismatch { .. }), "{err}");
    assert!(!upload.exists());
    assert!(store.blob_meta(&hash).unwrap().is_none());

    // Right hash, wrong kind: a Wasm source is not an artifact.
    std::fs::write(&upload, &source).unwrap();
    let kind = BlobKind::Artifact {
        target: Target::X86_64Linux,
        fingerprint: "f".repeat(32),
    };
    let err = store.adopt_blob_file(&upload, kind, &hash).unwrap_err();
    assert!(err.to_string().contains("no ELF header"), "{err}");
    assert!(store.blob_meta(&hash).unwrap().is_none());

    // A file outside the store's tmp/ is never adopted (no cross-filesystem renames).
    let outside = dir.path().join("elsewhere.wasm");
    std::fs::write(&outside, &source).unwrap();
    assert!(
        store
            .adopt_blob_file(&outside, BlobKind::Source, &hash)
            .is_err()
    );
    assert!(outside.exists());

    // The good file is renamed into place, indexed, and survives a reopen.
    std::fs::write(&upload, &source).unwrap();
    assert_eq!(
        store
            .adopt_blob_file(&upload, BlobKind::Source, &hash)
            .unwrap(),
        hash
    );
    assert!(!upload.exists());
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.read_blob(&hash).unwrap(), source);
    assert!(store.verify().unwrap().is_ok());
}

#[test]
fn abandoned_partial_uploads_expire_and_fresh_ones_stay() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let (a, b) = ("a".repeat(64), "b".repeat(64));
    let old = store.partial_path(Partial::PushUpload(&a));
    let fresh = store.partial_path(Partial::PeerFetch(&b));
    std::fs::write(&old, vec![1u8; 4096]).unwrap();
    std::fs::write(&fresh, vec![2u8; 100]).unwrap();
    let two_days_ago = std::time::SystemTime::now() - Duration::from_secs(48 * 3600);
    std::fs::File::options()
        .write(true)
        .open(&old)
        .unwrap()
        .set_modified(two_days_ago)
        .unwrap();

    let (files, bytes) = store
        .expire_partials(Duration::from_secs(24 * 3600))
        .unwrap();
    assert_eq!((files, bytes), (1, 4096));
    assert!(!old.exists());
    assert!(fresh.exists());
}

#[test]
fn resumable_partials_survive_a_reopen_and_interrupted_puts_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let hash = "c".repeat(64);
    let pushed = store.partial_path(Partial::PushUpload(&hash));
    let fetched = store.partial_path(Partial::PeerFetch(&hash));
    assert_ne!(pushed, fetched);
    std::fs::write(&pushed, vec![1u8; 300]).unwrap();
    std::fs::write(&fetched, vec![2u8; 200]).unwrap();
    let interrupted_put = store.root().join("tmp").join("put-7-x");
    std::fs::write(&interrupted_put, b"half").unwrap();
    drop(store);

    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.partial_len(Partial::PushUpload(&hash)), 300);
    assert_eq!(store.partial_len(Partial::PeerFetch(&hash)), 200);
    assert_eq!(store.partial_len(Partial::PeerFetch(&"d".repeat(64))), 0);
    assert!(!interrupted_put.exists());
}
