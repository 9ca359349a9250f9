//! The store on disk: atomic puts, manifests, activation, gc, verify, and refusals that leave
//! everything else as it was.

use std::time::Duration;

use edged_artifacts::{BlobKind, Manifest, Partial, Store, StoreError};
use edged_compiler::{CompileOptions, Target, compile};
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

fn flip_byte(path: &std::path::Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(path, &bytes).unwrap();
}

#[test]
fn a_damaged_blob_is_quarantined_and_replaced_by_a_fresh_copy() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let compiled = compile(
        &guest_bytes("init-heavy-p1.wasm"),
        &CompileOptions::default(),
    )
    .unwrap();
    let manifest = store_compiled(&store, "app", 1, &compiled);
    let source = &manifest.source.blake3;
    store.check_blob(source).unwrap();
    flip_byte(&store.blob_path(source));

    let damage = store.check_blob(source).unwrap_err();
    assert_eq!(damage.damaged_blob(), Some(source.as_str()), "{damage}");
    assert_eq!(store.verify().unwrap().damaged_blobs, vec![source.clone()]);

    // Storing the same bytes again repairs it; the damaged copy is kept aside, not deleted.
    store
        .put_blob(&compiled.source, BlobKind::Source, Some(source))
        .unwrap();
    store.check_blob(source).unwrap();
    let kept = dir.path().join("damaged").join(source);
    assert_ne!(std::fs::read(&kept).unwrap(), compiled.source);
    let report = store.verify().unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);

    // An upload adopted over a damaged copy replaces it too.
    let artifact = &manifest.artifacts[0];
    flip_byte(&store.blob_path(&artifact.blake3));
    let upload = store.partial_path(Partial::PushUpload(&artifact.blake3));
    std::fs::write(&upload, &compiled.artifacts[0].bytes).unwrap();
    store
        .adopt_blob_file(
            &upload,
            artifact_kind(&manifest, artifact.target),
            &artifact.blake3,
        )
        .unwrap();
    store.check_blob(&artifact.blake3).unwrap();
    assert!(store.verify().unwrap().is_ok());
}

#[test]
fn a_quarantined_blob_is_known_damage_until_a_fresh_copy_arrives() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let compiled = compile(
        &guest_bytes("init-heavy-p1.wasm"),
        &CompileOptions::default(),
    )
    .unwrap();
    let manifest = store_compiled(&store, "app", 1, &compiled);
    store.activate("app", 1).unwrap();
    let source = manifest.source.blake3.clone();
    flip_byte(&store.blob_path(&source));

    let moved = store.quarantine_blob(&source, "test").unwrap().unwrap();
    assert_eq!(moved, dir.path().join("damaged").join(&source));
    assert!(store.blob_meta(&source).unwrap().is_none());
    let report = store.verify().unwrap();
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    assert!(
        report.problems[0].contains("pushing the same .wasm again repairs it"),
        "{:?}",
        report.problems
    );
    // Explained damage does not stop housekeeping; the other blobs stay referenced.
    let gc = store.gc(Duration::ZERO).unwrap();
    assert!(gc.blobs_removed.is_empty(), "{gc:?}");

    store
        .put_blob(&compiled.source, BlobKind::Source, Some(&source))
        .unwrap();
    assert!(store.verify().unwrap().is_ok());
}

#[test]
fn a_missing_or_emptied_index_next_to_blobs_is_refused_and_nothing_is_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = {
        let store = Store::open(dir.path()).unwrap();
        let manifest = deploy(&store, "app", 1);
        store.activate("app", 1).unwrap();
        manifest
    };
    let blob_files = || {
        manifest
            .blob_hashes()
            .filter(|h| dir.path().join("blobs").join(&h[..2]).join(h).exists())
            .count()
    };
    let held = blob_files();
    assert_eq!(held, 3);
    let index = dir.path().join("index");
    let backup = dir.path().join("index.backup");
    copy_dir(&index, &backup);

    // Deleted.
    std::fs::remove_dir_all(&index).unwrap();
    let err = Store::open(dir.path()).err().unwrap();
    assert!(matches!(err, StoreError::IndexMissing { .. }), "{err}");
    let message = err.to_string();
    assert!(message.contains(&index.display().to_string()), "{message}");
    assert!(message.contains("Restore"), "{message}");
    assert!(!index.exists(), "no empty index may be created");
    assert_eq!(blob_files(), held);

    // Truncated: sled opens an emptied log as an empty database without a word.
    copy_dir(&backup, &index);
    std::fs::File::options()
        .write(true)
        .open(index.join("db"))
        .unwrap()
        .set_len(0)
        .unwrap();
    let err = Store::open(dir.path()).err().unwrap();
    assert!(matches!(err, StoreError::IndexLost { .. }), "{err}");
    assert!(err.to_string().contains(&index.display().to_string()));
    assert_eq!(blob_files(), held);

    // Unreadable: sled cannot open it at all.
    std::fs::remove_dir_all(&index).unwrap();
    copy_dir(&backup, &index);
    std::fs::File::options()
        .write(true)
        .open(index.join("conf"))
        .unwrap()
        .set_len(10)
        .unwrap();
    let err = Store::open(dir.path()).err().unwrap();
    assert!(matches!(err, StoreError::IndexUnreadable { .. }), "{err}");
    assert_eq!(blob_files(), held);

    // Restored from the backup: everything is back.
    std::fs::remove_dir_all(&index).unwrap();
    copy_dir(&backup, &index);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.active_manifest("app").unwrap(), Some(manifest));
    assert!(store.verify().unwrap().is_ok());
}

#[test]
fn a_new_node_whose_empty_index_was_deleted_starts_fresh() {
    let dir = tempfile::tempdir().unwrap();
    drop(Store::open(dir.path()).unwrap());
    std::fs::remove_dir_all(dir.path().join("index")).unwrap();
    let store = Store::open(dir.path()).unwrap();
    deploy(&store, "app", 1);
    drop(store);
    Store::open(dir.path()).unwrap();
}

#[test]
fn a_second_opener_is_told_the_index_is_locked_and_touches_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    // A put in progress (its temp file) must survive another process's attempt to open.
    let put = dir.path().join("tmp").join("put-0000000000000000-0");
    std::fs::write(&put, b"in progress").unwrap();
    let err = Store::open(dir.path()).err().unwrap();
    assert!(matches!(err, StoreError::Locked { .. }), "{err}");
    assert!(put.exists());
    drop(store);
}

#[test]
fn gc_refuses_while_the_index_looks_damaged() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    // Blobs but no manifest at all: what an index that lost its manifests looks like.
    let orphan = compile(&guest_bytes("trap.wat"), &CompileOptions::default()).unwrap();
    let hash = store
        .put_blob(&orphan.source, BlobKind::Source, None)
        .unwrap();
    let err = store.gc(Duration::ZERO).unwrap_err();
    assert!(matches!(err, StoreError::GcRefused(_)), "{err}");
    assert!(store.blob_path(&hash).exists());

    // A manifest whose source the index lost (not quarantined): refused too.
    let manifest = deploy(&store, "app", 1);
    store.activate("app", 1).unwrap();
    assert_eq!(
        store.gc(Duration::ZERO).unwrap().blobs_removed,
        vec![hash.clone()]
    );
    drop(store);
    // Simulate lost entries: a blob index entry vanishes while its file stays.
    {
        let db = sled::open(dir.path().join("index")).unwrap();
        db.open_tree("blobs")
            .unwrap()
            .remove(manifest.source.blake3.as_bytes())
            .unwrap();
        db.flush().unwrap();
    }
    let store = Store::open(dir.path()).unwrap();
    let err = store.gc(Duration::ZERO).unwrap_err();
    assert!(matches!(err, StoreError::GcRefused(_)), "{err}");
    assert!(err.to_string().contains("not indexed"), "{err}");
    for hash in manifest.blob_hashes() {
        assert!(store.blob_path(hash).exists(), "{hash} deleted");
    }
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}
