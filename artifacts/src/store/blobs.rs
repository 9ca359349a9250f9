//! Blob files: putting bytes or adopting a written file as a blob (checked against its hash
//! and kind, renamed into `blobs/`, then indexed), checking, quarantining, reading and mapping
//! them. [`BlobKind`] and [`BlobMeta`] are what the index records of each.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use edged_compiler::{Target, content_hash};
use serde::{Deserialize, Serialize};

use super::index::decode;
use super::{Store, StoreError, fsync_dir, io_err, now_secs};
use crate::artifact_check::check_artifact;
use crate::manifest::Manifest;

/// What a blob is, recorded at put time and checked again by `verify`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum BlobKind {
    /// An operator's `.wasm` (core module or component binary).
    Source,
    /// A native `.cwasm` for `target`, compiled by an engine with `fingerprint`.
    Artifact { target: Target, fingerprint: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobMeta {
    pub size: u64,
    #[serde(flatten)]
    pub kind: BlobKind,
    /// Seconds since the Unix epoch.
    pub stored_at: u64,
}

/// Names concurrent puts' temp files apart.
static PUT_SEQ: AtomicU64 = AtomicU64::new(0);

/// `path` mapped read-only: checking a 50 MB upload reads it from the page cache in place
/// instead of copying it into a fresh allocation first.
fn map_file(path: &Path) -> Result<memmap2::Mmap, StoreError> {
    let file = File::open(path).map_err(io_err("open", path))?;
    // SAFETY: the map is read-only and lives only while this store checks the file. Files in
    // tmp/ and blobs/ are written by this process alone (one writer per upload, blobs are
    // immutable once renamed), so nothing truncates it under the map.
    unsafe { memmap2::Mmap::map(&file) }.map_err(io_err("map", path))
}

/// Why `bytes` cannot be a blob of `kind`: a source must be Wasm (or WAT), an artifact a
/// complete ELF for its target.
fn kind_problem(bytes: &[u8], kind: &BlobKind) -> Option<String> {
    match kind {
        BlobKind::Source => edged_compiler::to_binary(bytes)
            .err()
            .map(|e| e.to_string()),
        BlobKind::Artifact { target, .. } => check_artifact(bytes, *target).err(),
    }
}

impl Store {
    /// Where the blob named `hash` lives (whether or not it is stored).
    pub fn blob_path(&self, hash: &str) -> PathBuf {
        let fanout = hash.get(..2).unwrap_or("xx");
        self.root.join("blobs").join(fanout).join(hash)
    }

    /// Stores `bytes` as a blob of `kind`. With `expected`, the content must hash to it. Kind
    /// checks run first: a source must be Wasm, an artifact a complete ELF for its target.
    /// Returns the blob's hash. Storing a blob that is already present is a no-op.
    pub fn put_blob(
        &self,
        bytes: &[u8],
        kind: BlobKind,
        expected: Option<&str>,
    ) -> Result<String, StoreError> {
        let hash = content_hash(bytes);
        if let Some(expected) = expected
            && expected != hash
        {
            return Err(StoreError::HashMismatch {
                expected: expected.to_string(),
                actual: hash,
            });
        }
        if let Some(reason) = kind_problem(bytes, &kind) {
            return Err(StoreError::BadBlob { hash, reason });
        }
        // Already stored and intact: nothing to do. A damaged copy is moved aside first.
        if self.holds_intact(&hash)? {
            return Ok(hash);
        }

        let tmp_path = self.root.join("tmp").join(format!(
            "put-{}-{}",
            &hash[..16],
            PUT_SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let mut file = File::create(&tmp_path).map_err(io_err("create", &tmp_path))?;
        file.write_all(bytes)
            .and_then(|_| file.sync_all())
            .map_err(io_err("write", &tmp_path))?;
        drop(file);
        // Re-read what reached the disk: the bytes in memory are not what we promise to keep.
        let written = fs::read(&tmp_path).map_err(io_err("read back", &tmp_path))?;
        let written_hash = content_hash(&written);
        if written_hash != hash {
            let _ = fs::remove_file(&tmp_path);
            return Err(StoreError::Corrupt {
                hash,
                reason: format!("read back from {} as {written_hash}", tmp_path.display()),
            });
        }

        self.install_blob(&tmp_path, hash, bytes.len() as u64, kind)
    }

    /// Stores the file at `path` as the blob `expected` of `kind` by renaming it into place:
    /// how large uploads enter the store without another copy. `path` must be a file in this
    /// store's `tmp/` that the caller has written in full and fsynced. Its content is checked
    /// exactly as [`Store::put_blob`] checks bytes; a file that fails is removed. A blob that is
    /// already stored intact is kept and the file removed.
    pub fn adopt_blob_file(
        &self,
        path: &Path,
        kind: BlobKind,
        expected: &str,
    ) -> Result<String, StoreError> {
        let tmp = self.root.join("tmp");
        if path.parent() != Some(tmp.as_path()) {
            return Err(StoreError::Io {
                action: "adopt (not in the store's tmp/)",
                path: path.to_path_buf(),
                source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
            });
        }
        let bytes = map_file(path)?;
        let refuse = |e: StoreError| {
            let _ = fs::remove_file(path);
            e
        };
        let hash = content_hash(&bytes);
        if hash != expected {
            return Err(refuse(StoreError::HashMismatch {
                expected: expected.to_string(),
                actual: hash,
            }));
        }
        if let Some(reason) = kind_problem(&bytes, &kind) {
            return Err(refuse(StoreError::BadBlob { hash, reason }));
        }
        if self.holds_intact(&hash)? {
            let _ = fs::remove_file(path);
            return Ok(hash);
        }
        self.install_blob(path, hash, bytes.len() as u64, kind)
    }

    /// Whether blob `hash` is stored and still passes its checks. A stored copy that does not
    /// is quarantined (so the caller's fresh copy can take its place) and `false` returned.
    fn holds_intact(&self, hash: &str) -> Result<bool, StoreError> {
        match self.check_blob(hash) {
            Ok(_) => Ok(true),
            Err(StoreError::MissingBlob(_)) => Ok(false),
            Err(damage @ StoreError::Corrupt { .. }) => {
                self.quarantine_blob(hash, &damage.to_string())?;
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Re-hashes stored blob `hash` against its name and index entry: [`StoreError::Corrupt`]
    /// when its file is damaged or unreadable, [`StoreError::MissingBlob`] when it is not
    /// indexed. Changes nothing.
    pub fn check_blob(&self, hash: &str) -> Result<BlobMeta, StoreError> {
        self.read_checked(hash).map(|(_, _, meta)| meta)
    }

    /// Takes damaged blob `hash` out of the store so a fresh copy can be stored: its index
    /// entry (and any record of it as this node's compile) is dropped first, then its file is
    /// moved to `damaged/<hash>` (replacing an older damaged copy), never deleted. Logs a
    /// warning with `reason`. Returns where the file went (`None` when there was no file).
    pub fn quarantine_blob(&self, hash: &str, reason: &str) -> Result<Option<PathBuf>, StoreError> {
        let _guard = self.blob_lock.lock().unwrap_or_else(|p| p.into_inner());
        // Index first, as for any deletion: a crash after it leaves an unindexed file.
        self.blobs.remove(hash.as_bytes())?;
        for entry in self.compiled.iter() {
            let (k, v) = entry?;
            if v.as_ref() == hash.as_bytes() {
                self.compiled.remove(k)?;
            }
        }
        self.db.flush()?;
        let from = self.blob_path(hash);
        let damaged = self.root.join("damaged");
        let to = damaged.join(hash);
        let moved = match fs::rename(&from, &to) {
            Ok(()) => Some(to),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Either there is no file, or no damaged/ yet.
                if from.exists() {
                    fs::create_dir_all(&damaged).map_err(io_err("create directory", &damaged))?;
                    fs::rename(&from, &to).map_err(io_err("move aside", &from))?;
                    Some(to)
                } else {
                    None
                }
            }
            Err(e) => return Err(io_err("move aside", &from)(e)),
        };
        match &moved {
            Some(to) => tracing::warn!(
                blob = %hash,
                moved_to = %to.display(),
                "damaged blob taken out of the store (a fresh copy replaces it): {reason}"
            ),
            None => tracing::warn!(
                blob = %hash,
                "missing blob taken out of the store index (a fresh copy replaces it): {reason}"
            ),
        }
        Ok(moved)
    }

    /// Renames a written, fsynced and verified file from `tmp/` to its blob path, makes the
    /// rename durable, then indexes it: the index never names a blob before its file is in place.
    fn install_blob(
        &self,
        tmp_path: &Path,
        hash: String,
        size: u64,
        kind: BlobKind,
    ) -> Result<String, StoreError> {
        let final_path = self.blob_path(&hash);
        let dir = final_path.parent().expect("blob paths have a fan-out dir");
        let _guard = self.blob_lock.lock().unwrap_or_else(|p| p.into_inner());
        fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
        fs::rename(tmp_path, &final_path).map_err(io_err("rename into", &final_path))?;
        fsync_dir(dir)?;
        let meta = BlobMeta {
            size,
            kind,
            stored_at: now_secs(),
        };
        self.blobs.insert(
            hash.as_bytes(),
            serde_json::to_vec(&meta).expect("BlobMeta serializes"),
        )?;
        self.db.flush()?;
        Ok(hash)
    }

    /// Stores a compiler output's source and artifacts (each checked against `manifest`'s
    /// hashes), then indexes `manifest`.
    pub fn put_compiled(
        &self,
        compiled: &edged_compiler::Compiled,
        manifest: &Manifest,
    ) -> Result<(), StoreError> {
        self.put_blob(
            &compiled.source,
            BlobKind::Source,
            Some(&manifest.source.blake3),
        )?;
        for artifact in &compiled.artifacts {
            let kind = BlobKind::Artifact {
                target: artifact.target,
                fingerprint: artifact.fingerprint.clone(),
            };
            self.put_blob(&artifact.bytes, kind, Some(&artifact.blake3))?;
        }
        self.put_manifest(manifest)
    }

    /// [`Store::put_compiled`] for a middleware chain: stores each part's source first (a part
    /// already here, in front of another app, is the same blob).
    pub fn put_chain(
        &self,
        compiled: &edged_compiler::Compiled,
        parts: &[edged_compiler::ComposedPart],
        manifest: &Manifest,
    ) -> Result<(), StoreError> {
        for part in parts {
            self.put_blob(&part.source, BlobKind::Source, Some(&part.blake3))?;
        }
        self.put_compiled(compiled, manifest)
    }

    pub fn blob_meta(&self, hash: &str) -> Result<Option<BlobMeta>, StoreError> {
        match self.blobs.get(hash.as_bytes())? {
            Some(v) => decode(hash.as_bytes(), &v).map(Some),
            None => Ok(None),
        }
    }

    /// All indexed blobs.
    pub fn blobs(&self) -> Result<Vec<(String, BlobMeta)>, StoreError> {
        self.blobs
            .iter()
            .map(|entry| {
                let (k, v) = entry?;
                Ok((String::from_utf8_lossy(&k).into_owned(), decode(&k, &v)?))
            })
            .collect()
    }

    /// Reads a blob, checking it still hashes to its name.
    pub fn read_blob(&self, hash: &str) -> Result<Vec<u8>, StoreError> {
        self.read_checked(hash).map(|(bytes, _, _)| bytes)
    }

    /// An indexed blob's file, mapped read-only, *without* re-hashing it: for a reader that
    /// hashes as it goes anyway (sync serves blobs through a Bao encoder, which does).
    pub fn map_blob(&self, hash: &str) -> Result<(memmap2::Mmap, BlobMeta), StoreError> {
        let meta = self
            .blob_meta(hash)?
            .ok_or_else(|| StoreError::MissingBlob(hash.to_string()))?;
        Ok((map_file(&self.blob_path(hash))?, meta))
    }

    /// The path of an indexed blob, after re-hashing the file: what a loader may map.
    pub fn verified_blob_path(&self, hash: &str) -> Result<(PathBuf, BlobMeta), StoreError> {
        self.read_checked(hash).map(|(_, path, meta)| (path, meta))
    }

    fn read_checked(&self, hash: &str) -> Result<(Vec<u8>, PathBuf, BlobMeta), StoreError> {
        let meta = self
            .blob_meta(hash)?
            .ok_or_else(|| StoreError::MissingBlob(hash.to_string()))?;
        let path = self.blob_path(hash);
        let bytes = fs::read(&path).map_err(|e| StoreError::Corrupt {
            hash: hash.to_string(),
            reason: format!("cannot read {}: {e}", path.display()),
        })?;
        check_content(hash, &meta, &bytes)?;
        Ok((bytes, path, meta))
    }
}

/// Size, hash and kind checks of blob content against its index entry.
pub(super) fn check_content(hash: &str, meta: &BlobMeta, bytes: &[u8]) -> Result<(), StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        hash: hash.to_string(),
        reason,
    };
    if bytes.len() as u64 != meta.size {
        return Err(corrupt(format!(
            "{} bytes on disk, {} indexed",
            bytes.len(),
            meta.size
        )));
    }
    let actual = content_hash(bytes);
    if actual != hash {
        return Err(corrupt(format!("content hashes to {actual}")));
    }
    if let BlobKind::Artifact { target, .. } = &meta.kind {
        check_artifact(bytes, *target).map_err(corrupt)?;
    }
    Ok(())
}
