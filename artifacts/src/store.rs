//! The content-addressed store: immutable BLAKE3-named blob files plus a sled index.
//!
//! ```text
//! <root>/index/        sled: blobs, manifests, active, compiled
//! <root>/blobs/ab/…    immutable files named by their BLAKE3 hash
//! <root>/tmp/          partial writes (see below)
//! <root>/damaged/      blob files that failed their hash, moved aside (see below)
//! <root>/store-id      names the index these blobs belong to (see below)
//! ```
//!
//! `tmp/` holds three kinds of partial file, all named by the store ([`Partial`]):
//! `put-*` (a [`Store::put_blob`] in progress; removed when the store opens, since nothing
//! resumes them), and `upload-<hash>` (a blob an operator is pushing) and `sync-<hash>` (a blob
//! being fetched from peers), which are **kept** across restarts so their transfers resume, and
//! are removed by [`Store::expire_partials`] once abandoned.
//!
//! The invariant every operation keeps, crash or not: **an index entry never points at a
//! missing or unverified blob.** A blob is written to `tmp/`, fsynced, hashed, renamed into
//! `blobs/`, the directory fsynced, and only then indexed. Deletion runs the other way round:
//! index entry first, then the file. A crash can therefore leave only unindexed files behind,
//! which `verify` reports as stray and `gc` removes.
//!
//! **Damage is repairable, and never silent.** A blob file that no longer hashes to its name is
//! [quarantined](Store::quarantine_blob): its index entry is dropped and the file moved to
//! `damaged/`, so a fresh copy (from the config's `.wasm`, a re-push, a peer, a recompile) can be
//! stored; [`Store::put_blob`] and [`Store::adopt_blob_file`] do this themselves when they meet a
//! damaged copy. The index is the only record of manifests, so losing it must not look like a new
//! node: `store-id` (a file) and the index carry the same random id, and [`Store::open`] refuses
//! an index that is missing, unreadable, or not the one the blob files were indexed in
//! ([`StoreError::IndexMissing`], [`StoreError::IndexLost`], [`StoreError::IndexUnreadable`])
//! while there are blob files to lose. [`Store::gc`] refuses to collect while the index looks
//! damaged ([`StoreError::GcRefused`]) and logs every file it deletes.
//!
//! Blob references are not stored: they are derived from the manifests (and the locally
//! compiled artifacts of their sources) whenever needed, so they cannot drift from them.
//!
//! A manifest is indexed only when its source blob is stored; artifacts for other targets than
//! this node's may be named without being held (a node keeps its own target's `.cwasm`).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use edged_compiler::{Target, content_hash};
use serde::{Deserialize, Serialize};

use crate::artifact_check::check_artifact;
use crate::manifest::{Manifest, validate_name};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("store index: {0}")]
    Index(#[from] sled::Error),
    #[error("store index entry {key} is unreadable: {reason}")]
    IndexEntry { key: String, reason: String },
    #[error("blob rejected: expected BLAKE3 {expected}, content hashes to {actual}")]
    HashMismatch { expected: String, actual: String },
    #[error("blob {hash} rejected: {reason}")]
    BadBlob { hash: String, reason: String },
    #[error("blob {hash} is corrupt on disk: {reason}")]
    Corrupt { hash: String, reason: String },
    #[error("blob {0} is not in the store")]
    MissingBlob(String),
    #[error("manifest {id} refused: {reason}")]
    BadManifest { id: String, reason: String },
    #[error("no manifest {0} in the store")]
    NoManifest(String),
    #[error("{0}")]
    Conflict(String),
    #[error(
        "store index {index} is missing, but {blob_files} blob files are in {blobs}: refusing to \
         start on an empty index (its manifests would be lost and housekeeping would delete the \
         blobs). Restore {index} from a backup, or, to start this node empty, move {blobs} \
         aside (config functions are redeployed from their .wasm; pushed ones must be pushed \
         again or synced from peers)"
    )]
    IndexMissing {
        index: PathBuf,
        blobs: PathBuf,
        blob_files: usize,
    },
    #[error(
        "store index {index} is empty or is not the index of the {blob_files} blob files in \
         {blobs} (it was truncated, replaced or recreated): refusing to start on it (its \
         manifests would be lost and housekeeping would delete the blobs). Restore {index} from \
         a backup, or, to start this node empty, move {index} and {blobs} aside (config \
         functions are redeployed from their .wasm; pushed ones must be pushed again or synced \
         from peers)"
    )]
    IndexLost {
        index: PathBuf,
        blobs: PathBuf,
        blob_files: usize,
    },
    #[error(
        "store index {index} is unreadable ({cause}): refusing to start on it. Restore {index} \
         from a backup, or, to start this node empty, move {index} and {blobs} aside (config \
         functions are redeployed from their .wasm; pushed ones must be pushed again or synced \
         from peers)"
    )]
    IndexUnreadable {
        index: PathBuf,
        blobs: PathBuf,
        /// Not `#[source]`: the message carries it, so a report shows it once.
        cause: sled::Error,
    },
    #[error("store index {index} is locked by another process (is edged running?)")]
    Locked { index: PathBuf },
    #[error("housekeeping refused to delete anything: {0}")]
    GcRefused(String),
}

impl StoreError {
    /// The blob this error says is damaged or gone on disk, if it says so: what a repair (a
    /// fresh copy of that blob) fixes.
    pub fn damaged_blob(&self) -> Option<&str> {
        match self {
            StoreError::Corrupt { hash, .. } | StoreError::MissingBlob(hash) => Some(hash),
            _ => None,
        }
    }
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io {
        action,
        path,
        source,
    }
}

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

/// What `verify` found. `problems` break the store's invariant; stray files do not.
#[derive(Debug, Default, Clone, Serialize)]
pub struct VerifyReport {
    pub blobs_checked: usize,
    pub bytes_hashed: u64,
    pub manifests_checked: usize,
    pub problems: Vec<String>,
    /// Indexed blobs whose file is damaged or unreadable (each also has a line in `problems`).
    pub damaged_blobs: Vec<String>,
    /// Blob files with no index entry (left by a crash mid-put); `gc` removes them.
    pub stray_files: Vec<PathBuf>,
}

impl VerifyReport {
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct GcReport {
    pub blobs_removed: Vec<String>,
    pub bytes_freed: u64,
    pub stray_files_removed: usize,
}

pub struct Store {
    root: PathBuf,
    db: sled::Db,
    blobs: sled::Tree,
    manifests: sled::Tree,
    active: sled::Tree,
    /// `source hash \0 init \0 fingerprint` → artifact hash, for artifacts this node compiled.
    compiled: sled::Tree,
    /// name → newest version ever indexed, kept after removals so old versions cannot be
    /// replayed.
    seen: sled::Tree,
    /// `name \0 version` → the operator signature a manifest arrived with (JSON), so it can be
    /// shown and forwarded to peers.
    signatures: sled::Tree,
    /// name → the newest fleet activation record applied for it (signed JSON, opaque here).
    activations: sled::Tree,
    /// `name \0 version` → where the deployment is published in an OCI registry
    /// (`oci://…@sha256:…`), for deployments that came from one.
    published: sled::Tree,
    /// Held by put (rename → index) and gc, so gc never sees a renamed-but-unindexed blob as
    /// stray and deletes it under a put.
    blob_lock: Mutex<()>,
}

/// A resumable partial blob in `tmp/`, by the blob's BLAKE3 name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Partial<'a> {
    /// Being received from an operator's push.
    PushUpload(&'a str),
    /// Being fetched from peers, verified chunk by chunk.
    PeerFetch(&'a str),
    /// Being downloaded from an OCI registry (HTTP Range resumes it). Unverified until whole:
    /// it is hashed as it is adopted, and removed if it does not match.
    RegistryFetch(&'a str),
}

/// The file (under the store root) and index key holding the store's id.
const STORE_ID_FILE: &str = "store-id";
const STORE_ID_KEY: &[u8] = b"store-id";

/// A new store's id: unique enough to tell one node's index from another's or a recreated one.
fn new_store_id(root: &Path) -> Vec<u8> {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let seed = format!("{nanos} {} {}", std::process::id(), root.display());
    content_hash(seed.as_bytes()).into_bytes()
}

/// Files named like blobs under `blobs/`: what an empty index would lose.
fn count_blob_files(blobs_dir: &Path) -> Result<usize, StoreError> {
    let mut count = 0;
    for fanout in fs::read_dir(blobs_dir).map_err(io_err("list", blobs_dir))? {
        let fanout = fanout.map_err(io_err("list", blobs_dir))?.path();
        if !fanout.is_dir() {
            continue;
        }
        for file in fs::read_dir(&fanout).map_err(io_err("list", &fanout))? {
            let file = file.map_err(io_err("list", &fanout))?;
            if is_blob_name(&file.file_name().to_string_lossy()) {
                count += 1;
            }
        }
    }
    Ok(count)
}

/// Names concurrent puts' temp files apart.
static PUT_SEQ: AtomicU64 = AtomicU64::new(0);

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn manifest_key(name: &str, version: u64) -> Vec<u8> {
    let mut key = name.as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(&version.to_be_bytes());
    key
}

fn decode_version(bytes: &[u8]) -> u64 {
    u64::from_be_bytes(bytes.try_into().unwrap_or_default())
}

fn compiled_key(source: &str, init: Option<&str>, fingerprint: &str) -> Vec<u8> {
    format!("{source}\0{}\0{fingerprint}", init.unwrap_or("")).into_bytes()
}

fn decode<T: for<'de> Deserialize<'de>>(key: &[u8], value: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(value).map_err(|e| StoreError::IndexEntry {
        key: String::from_utf8_lossy(key).replace('\0', "/"),
        reason: e.to_string(),
    })
}

fn is_blob_name(name: &str) -> bool {
    name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit())
}

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

fn fsync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", dir))
}

impl Store {
    /// Opens (creating if needed) the store under `root`. `put-*` files a crash left in `tmp/`
    /// are removed; resumable partials (push uploads, peer fetches) are kept.
    ///
    /// Refuses, naming the path and the way out, an index that is missing
    /// ([`StoreError::IndexMissing`]), unreadable ([`StoreError::IndexUnreadable`]), or empty or
    /// foreign ([`StoreError::IndexLost`]) while blob files are on disk: an empty index there
    /// would silently lose every manifest, and gc would then delete the blobs. With no blob
    /// files there is nothing to lose and a new index is started. An index another process
    /// holds (a running daemon) is [`StoreError::Locked`].
    pub fn open(root: impl AsRef<Path>) -> Result<Store, StoreError> {
        let root = root.as_ref().to_path_buf();
        for dir in ["blobs", "tmp"] {
            let path = root.join(dir);
            fs::create_dir_all(&path).map_err(io_err("create directory", &path))?;
        }
        let index = root.join("index");
        let blobs_dir = root.join("blobs");
        let blob_files = count_blob_files(&blobs_dir)?;
        if !index.exists() && blob_files > 0 {
            return Err(StoreError::IndexMissing {
                index,
                blobs: blobs_dir,
                blob_files,
            });
        }
        let db = sled::Config::new()
            .path(&index)
            .mode(sled::Mode::HighThroughput)
            .open()
            .map_err(|source| match source {
                // sled reports its lock as a plain I/O error; the message is all there is.
                sled::Error::Io(ref e) if e.to_string().contains("could not acquire lock") => {
                    StoreError::Locked {
                        index: index.clone(),
                    }
                }
                cause => StoreError::IndexUnreadable {
                    index: index.clone(),
                    blobs: blobs_dir.clone(),
                    cause,
                },
            })?;
        let store = Store {
            blobs: db.open_tree("blobs")?,
            manifests: db.open_tree("manifests")?,
            active: db.open_tree("active")?,
            compiled: db.open_tree("compiled")?,
            seen: db.open_tree("seen")?,
            signatures: db.open_tree("signatures")?,
            activations: db.open_tree("activations")?,
            published: db.open_tree("published")?,
            db,
            root,
            blob_lock: Mutex::new(()),
        };
        store.check_identity(blob_files)?;
        // Only now that this process holds the index lock: a second process (`edged verify`
        // next to a running daemon) must not remove the daemon's puts in progress.
        let tmp = store.root.join("tmp");
        for entry in fs::read_dir(&tmp).map_err(io_err("list", &tmp))? {
            let entry = entry.map_err(io_err("list", &tmp))?;
            if entry.file_name().to_string_lossy().starts_with("put-") {
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(store)
    }

    /// Checks that the index is the one the blob files were indexed in: `store-id` and the
    /// index's `meta/store-id` must agree. sled opens a truncated log as an empty database
    /// without a word, so an empty index next to blob files is caught here, not by sled.
    fn check_identity(&self, blob_files: usize) -> Result<(), StoreError> {
        let meta = self.db.open_tree("meta")?;
        let id_path = self.root.join(STORE_ID_FILE);
        let in_index = meta.get(STORE_ID_KEY)?.map(|v| v.to_vec());
        let in_file = match fs::read(&id_path) {
            Ok(bytes) => Some(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err("read", &id_path)(e)),
        };
        let index_has_entries = !self.blobs.is_empty() || !self.manifests.is_empty();
        let lost = || StoreError::IndexLost {
            index: self.root.join("index"),
            blobs: self.root.join("blobs"),
            blob_files,
        };
        let id = match (in_index, in_file) {
            (Some(index), Some(file)) if index == file => return Ok(()),
            // A crash between writing the index's id and the file's.
            (Some(index), None) => index,
            // An index that is not this store's (empty after truncation, recreated, or another
            // node's) with blob files to lose.
            (_, Some(_)) if blob_files > 0 => return Err(lost()),
            // Nothing to lose: a new node whose fresh index was deleted. Start a new one.
            (_, Some(file)) => file,
            // A store from before ids were kept: its index is trusted if it has entries.
            (None, None) if blob_files > 0 && !index_has_entries => return Err(lost()),
            (None, None) => new_store_id(&self.root),
        };
        meta.insert(STORE_ID_KEY, id.as_slice())?;
        self.db.flush()?;
        let tmp = self.root.join("tmp").join(STORE_ID_FILE);
        fs::write(&tmp, &id)
            .and_then(|_| File::open(&tmp)?.sync_all())
            .map_err(io_err("write", &tmp))?;
        fs::rename(&tmp, &id_path).map_err(io_err("rename into", &id_path))?;
        fsync_dir(&self.root)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the resumable partial file `partial` lives. Callers write it, then hand it to
    /// [`Store::adopt_blob_file`].
    pub fn partial_path(&self, partial: Partial<'_>) -> PathBuf {
        let name = match partial {
            Partial::PushUpload(hash) => format!("upload-{hash}"),
            Partial::PeerFetch(hash) => format!("sync-{hash}"),
            Partial::RegistryFetch(hash) => format!("registry-{hash}"),
        };
        self.root.join("tmp").join(name)
    }

    /// How many bytes of `partial` are on disk (0 when there is none).
    pub fn partial_len(&self, partial: Partial<'_>) -> u64 {
        fs::metadata(self.partial_path(partial))
            .map(|m| m.len())
            .unwrap_or(0)
    }

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

    /// Indexes a manifest. Every blob it names must already be stored with the right size and
    /// kind; a different manifest under the same name and version is refused.
    pub fn put_manifest(&self, manifest: &Manifest) -> Result<(), StoreError> {
        let id = manifest.id();
        let refuse = |reason: String| StoreError::BadManifest {
            id: id.clone(),
            reason,
        };
        validate_name(&manifest.name).map_err(&refuse)?;
        let source = self.blob_meta(&manifest.source.blake3)?.ok_or_else(|| {
            refuse(format!(
                "source blob {} is not stored",
                manifest.source.blake3
            ))
        })?;
        if source.kind != BlobKind::Source || source.size != manifest.source.size {
            return Err(refuse(format!(
                "source blob {} is stored as {:?} of {} bytes, manifest says source of {} bytes",
                manifest.source.blake3, source.kind, source.size, manifest.source.size
            )));
        }
        // A chain's parts are source blobs of the deployment, held like its source.
        for part in manifest.part_refs() {
            let meta = self.blob_meta(&part.blake3)?.ok_or_else(|| {
                refuse(format!(
                    "blob {} of {} `{}` is not stored",
                    part.blake3, part.role, part.name
                ))
            })?;
            if meta.kind != BlobKind::Source || meta.size != part.size {
                return Err(refuse(format!(
                    "blob {} of {} `{}` is stored as {:?} of {} bytes, manifest says source of {} bytes",
                    part.blake3, part.role, part.name, meta.kind, meta.size, part.size
                )));
            }
        }
        // A node holds the source and the artifacts for its own target; the other targets'
        // artifacts are named (so peers can fetch them) but need not be here. Those that are
        // here must be what the manifest says they are.
        for artifact in &manifest.artifacts {
            let Some(meta) = self.blob_meta(&artifact.blake3)? else {
                continue;
            };
            let expected = BlobKind::Artifact {
                target: artifact.target,
                fingerprint: artifact.fingerprint.clone(),
            };
            if meta.kind != expected || meta.size != artifact.size {
                return Err(refuse(format!(
                    "artifact blob {} is stored as {:?} of {} bytes, manifest says {:?} of {} bytes",
                    artifact.blake3, meta.kind, meta.size, expected, artifact.size
                )));
            }
        }
        let key = manifest_key(&manifest.name, manifest.version);
        let encoded = serde_json::to_vec(manifest).expect("Manifest serializes");
        self.seen
            .fetch_and_update(manifest.name.as_bytes(), |old| {
                let old = old.map(decode_version).unwrap_or(0);
                Some(old.max(manifest.version).to_be_bytes().to_vec())
            })?;
        match self
            .manifests
            .compare_and_swap(&key, None as Option<&[u8]>, Some(encoded))?
        {
            Ok(()) => {}
            Err(existing) => {
                let existing: Manifest =
                    decode(&key, existing.current.as_deref().unwrap_or_default())?;
                if &existing != manifest {
                    return Err(StoreError::Conflict(format!(
                        "{id} is already stored with different content"
                    )));
                }
            }
        }
        self.db.flush()?;
        Ok(())
    }

    /// Records the signature `name@version` arrived with (opaque to the store).
    pub fn put_signature(
        &self,
        name: &str,
        version: u64,
        signature: &[u8],
    ) -> Result<(), StoreError> {
        self.signatures
            .insert(manifest_key(name, version), signature)?;
        self.db.flush()?;
        Ok(())
    }

    pub fn signature(&self, name: &str, version: u64) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .signatures
            .get(manifest_key(name, version))?
            .map(|v| v.to_vec()))
    }

    /// Records where `name@version` is published in an OCI registry (opaque to the store).
    pub fn put_published(
        &self,
        name: &str,
        version: u64,
        reference: &str,
    ) -> Result<(), StoreError> {
        self.published
            .insert(manifest_key(name, version), reference.as_bytes())?;
        self.db.flush()?;
        Ok(())
    }

    /// Where `name@version` is published, if it came from a registry.
    pub fn published(&self, name: &str, version: u64) -> Result<Option<String>, StoreError> {
        Ok(self
            .published
            .get(manifest_key(name, version))?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Records the fleet activation record `name` now follows (opaque to the store), durably.
    pub fn put_activation(&self, name: &str, record: &[u8]) -> Result<(), StoreError> {
        self.activations.insert(name.as_bytes(), record)?;
        self.db.flush()?;
        Ok(())
    }

    /// The fleet activation record `name` follows, if any.
    pub fn activation(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.activations.get(name.as_bytes())?.map(|v| v.to_vec()))
    }

    /// Every name's fleet activation record.
    pub fn activations(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        self.activations
            .iter()
            .values()
            .map(|v| Ok(v?.to_vec()))
            .collect()
    }

    /// The newest version of `name` this store has ever indexed (0 if none), removed or not.
    pub fn newest_version_seen(&self, name: &str) -> Result<u64, StoreError> {
        Ok(self
            .seen
            .get(name.as_bytes())?
            .map(|v| decode_version(&v))
            .unwrap_or(0))
    }

    pub fn manifest(&self, name: &str, version: u64) -> Result<Option<Manifest>, StoreError> {
        let key = manifest_key(name, version);
        match self.manifests.get(&key)? {
            Some(v) => decode(&key, &v).map(Some),
            None => Ok(None),
        }
    }

    /// Every stored manifest, by name then version.
    pub fn manifests(&self) -> Result<Vec<Manifest>, StoreError> {
        self.manifests
            .iter()
            .map(|entry| {
                let (k, v) = entry?;
                decode(&k, &v)
            })
            .collect()
    }

    /// Makes `name@version` the version served for `name`.
    pub fn activate(&self, name: &str, version: u64) -> Result<(), StoreError> {
        if self.manifest(name, version)?.is_none() {
            return Err(StoreError::NoManifest(format!("{name}@{version}")));
        }
        self.active
            .insert(name.as_bytes(), &version.to_be_bytes())?;
        self.db.flush()?;
        Ok(())
    }

    pub fn active_version(&self, name: &str) -> Result<Option<u64>, StoreError> {
        Ok(self
            .active
            .get(name.as_bytes())?
            .map(|v| decode_version(&v)))
    }

    pub fn active_manifest(&self, name: &str) -> Result<Option<Manifest>, StoreError> {
        match self.active_version(name)? {
            Some(version) => self.manifest(name, version),
            None => Ok(None),
        }
    }

    /// Removes a manifest from the index (its blobs go at the next `gc`). The active version
    /// of a name cannot be removed.
    pub fn remove_manifest(&self, name: &str, version: u64) -> Result<(), StoreError> {
        if self.active_version(name)? == Some(version) {
            return Err(StoreError::Conflict(format!(
                "{name}@{version} is active; activate another version first"
            )));
        }
        if self
            .manifests
            .remove(manifest_key(name, version))?
            .is_none()
        {
            return Err(StoreError::NoManifest(format!("{name}@{version}")));
        }
        self.published.remove(manifest_key(name, version))?;
        self.db.flush()?;
        Ok(())
    }

    /// Records an artifact this node compiled itself from `source` (already stored with
    /// [`Store::put_blob`]), so the next start finds it instead of compiling again.
    pub fn record_compiled(
        &self,
        source: &str,
        init: Option<&str>,
        fingerprint: &str,
        artifact: &str,
    ) -> Result<(), StoreError> {
        if self.blob_meta(artifact)?.is_none() {
            return Err(StoreError::MissingBlob(artifact.to_string()));
        }
        self.compiled
            .insert(compiled_key(source, init, fingerprint), artifact.as_bytes())?;
        self.db.flush()?;
        Ok(())
    }

    pub fn compiled(
        &self,
        source: &str,
        init: Option<&str>,
        fingerprint: &str,
    ) -> Result<Option<String>, StoreError> {
        Ok(self
            .compiled
            .get(compiled_key(source, init, fingerprint))?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Blob hashes reachable from a manifest, with the manifests that reach each one.
    pub fn references(&self) -> Result<BTreeMap<String, BTreeSet<String>>, StoreError> {
        let mut refs: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let manifests = self.manifests()?;
        let mut source_owners: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for m in &manifests {
            for hash in m.blob_hashes() {
                refs.entry(hash.to_string()).or_default().insert(m.id());
            }
            source_owners
                .entry(m.source.blake3.as_str())
                .or_default()
                .push(m.id());
        }
        for entry in self.compiled.iter() {
            let (k, v) = entry?;
            let key = String::from_utf8_lossy(&k);
            let source = key.split('\0').next().unwrap_or_default();
            if let Some(owners) = source_owners.get(source) {
                let artifact = String::from_utf8_lossy(&v).into_owned();
                refs.entry(artifact)
                    .or_default()
                    .extend(owners.iter().cloned());
            }
        }
        Ok(refs)
    }

    /// Deletes blobs no manifest reaches, and stray files, that are older than `min_age` (so
    /// blobs of a push still in flight survive).
    ///
    /// Refuses ([`StoreError::GcRefused`], nothing deleted) while the index looks damaged: it
    /// names something it does not hold that no quarantine explains, or it holds blobs but no
    /// manifest at all. Deleting "unreferenced" blobs then would delete what a lost index entry
    /// referenced. Every file deleted is logged.
    pub fn gc(&self, min_age: Duration) -> Result<GcReport, StoreError> {
        let _guard = self.blob_lock.lock().unwrap_or_else(|p| p.into_inner());
        let suspicious = self.index_problems()?.unexplained;
        if let Some(first) = suspicious.first() {
            return Err(StoreError::GcRefused(format!(
                "the index looks damaged ({} problem{}, first: {first}); run `edged verify`",
                suspicious.len(),
                if suspicious.len() == 1 { "" } else { "s" }
            )));
        }
        if self.manifests.is_empty() && !self.blobs.is_empty() {
            return Err(StoreError::GcRefused(format!(
                "the index holds {} blobs but no manifest, as a damaged index would; run \
                 `edged verify`",
                self.blobs.len()
            )));
        }
        let refs = self.references()?;
        let cutoff = now_secs().saturating_sub(min_age.as_secs());
        let mut report = GcReport::default();

        // Compiled-artifact records whose source is gone go first, so no record outlives its blob.
        for entry in self.compiled.iter() {
            let (k, v) = entry?;
            if !refs.contains_key(String::from_utf8_lossy(&v).as_ref()) {
                self.compiled.remove(k)?;
            }
        }
        self.db.flush()?;

        for (hash, meta) in self.blobs()? {
            if refs.contains_key(&hash) || meta.stored_at > cutoff {
                continue;
            }
            // Index entry first: a crash after this leaves a stray file, never a dangling entry.
            self.blobs.remove(hash.as_bytes())?;
            self.db.flush()?;
            let path = self.blob_path(&hash);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("remove", &path)(e)),
            }
            tracing::info!(blob = %hash, size = meta.size, kind = ?meta.kind, "deleted unreferenced blob");
            report.bytes_freed += meta.size;
            report.blobs_removed.push(hash);
        }

        for path in self.stray_files()? {
            let old_enough = fs::metadata(&path)
                .and_then(|m| m.modified())
                .map(|t| t.elapsed().unwrap_or_default() >= min_age)
                .unwrap_or(true);
            let size = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            if old_enough && fs::remove_file(&path).is_ok() {
                tracing::info!(file = %path.display(), size, "deleted stray file (not indexed)");
                report.stray_files_removed += 1;
            }
        }
        Ok(report)
    }

    /// Removes partial uploads (`tmp/` files other than in-progress puts) untouched for
    /// `max_age`: a push abandoned for that long will not resume, and an edge box's disk is
    /// small. Returns how many files and bytes were removed.
    pub fn expire_partials(&self, max_age: Duration) -> Result<(usize, u64), StoreError> {
        let tmp = self.root.join("tmp");
        let (mut files, mut bytes) = (0, 0);
        for entry in fs::read_dir(&tmp).map_err(io_err("list", &tmp))? {
            let entry = entry.map_err(io_err("list", &tmp))?;
            if entry.file_name().to_string_lossy().starts_with("put-") {
                continue;
            }
            let Ok(meta) = entry.metadata() else { continue };
            let idle = meta
                .modified()
                .ok()
                .and_then(|t| t.elapsed().ok())
                .unwrap_or_default();
            if meta.is_file() && idle >= max_age && fs::remove_file(entry.path()).is_ok() {
                files += 1;
                bytes += meta.len();
            }
        }
        Ok((files, bytes))
    }

    fn stray_files(&self) -> Result<Vec<PathBuf>, StoreError> {
        let mut stray = Vec::new();
        let blobs_dir = self.root.join("blobs");
        for fanout in fs::read_dir(&blobs_dir).map_err(io_err("list", &blobs_dir))? {
            let fanout = fanout.map_err(io_err("list", &blobs_dir))?.path();
            if !fanout.is_dir() {
                stray.push(fanout);
                continue;
            }
            for file in fs::read_dir(&fanout).map_err(io_err("list", &fanout))? {
                let path = file.map_err(io_err("list", &fanout))?.path();
                let name = path.file_name().unwrap_or_default().to_string_lossy();
                if !is_blob_name(&name) || !self.blobs.contains_key(name.as_bytes())? {
                    stray.push(path);
                }
            }
        }
        Ok(stray)
    }

    /// Re-hashes every blob and cross-checks the index. Nothing is changed (a damaged blob is
    /// reported, not quarantined: that is for whoever brings a fresh copy).
    pub fn verify(&self) -> Result<VerifyReport, StoreError> {
        let mut report = VerifyReport::default();
        for (hash, meta) in self.blobs()? {
            report.blobs_checked += 1;
            let path = self.blob_path(&hash);
            match fs::read(&path) {
                Ok(bytes) => {
                    report.bytes_hashed += bytes.len() as u64;
                    if let Err(e) = check_content(&hash, &meta, &bytes) {
                        report.problems.push(e.to_string());
                        report.damaged_blobs.push(hash);
                    }
                }
                Err(e) => {
                    report.problems.push(format!(
                        "blob {hash}: indexed but unreadable at {}: {e}",
                        path.display()
                    ));
                    report.damaged_blobs.push(hash);
                }
            }
        }
        let index = self.index_problems()?;
        report.manifests_checked = index.manifests_checked;
        report.problems.extend(index.explained);
        report.problems.extend(index.unexplained);
        report.stray_files = self.stray_files()?;
        Ok(report)
    }
}

/// What the index names but does not hold, from [`Store::index_problems`].
struct IndexProblems {
    manifests_checked: usize,
    /// Blobs a manifest names that were quarantined as damaged (their copy is in `damaged/`):
    /// known damage, repaired by a fresh copy.
    explained: Vec<String>,
    /// Anything else: a sign the index itself lost entries.
    unexplained: Vec<String>,
}

impl Store {
    /// Cross-checks the index without reading blob files: every manifest's source is indexed,
    /// every active version is stored, every compile record's artifact is indexed.
    fn index_problems(&self) -> Result<IndexProblems, StoreError> {
        let mut found = IndexProblems {
            manifests_checked: 0,
            explained: Vec::new(),
            unexplained: Vec::new(),
        };
        for manifest in self.manifests()? {
            found.manifests_checked += 1;
            let source = &manifest.source.blake3;
            if !self.blobs.contains_key(source.as_bytes())? {
                let quarantined = self.root.join("damaged").join(source);
                if quarantined.exists() {
                    found.explained.push(format!(
                        "manifest {} names source blob {source}, which was damaged and moved to \
                         {}; pushing the same .wasm again repairs it",
                        manifest.id(),
                        quarantined.display()
                    ));
                } else {
                    found.unexplained.push(format!(
                        "manifest {} names source blob {source}, which is not indexed",
                        manifest.id()
                    ));
                }
            }
        }
        for entry in self.active.iter() {
            let (k, v) = entry?;
            let name = String::from_utf8_lossy(&k).into_owned();
            let version = decode_version(&v);
            if self.manifest(&name, version)?.is_none() {
                found.unexplained.push(format!(
                    "{name} is active at version {version}, which is not stored"
                ));
            }
        }
        for entry in self.compiled.iter() {
            let (_, v) = entry?;
            let artifact = String::from_utf8_lossy(&v).into_owned();
            if !self.blobs.contains_key(v)? {
                found.unexplained.push(format!(
                    "compiled artifact {artifact} is recorded but not indexed"
                ));
            }
        }
        Ok(found)
    }
}

/// Size, hash and kind checks of blob content against its index entry.
fn check_content(hash: &str, meta: &BlobMeta, bytes: &[u8]) -> Result<(), StoreError> {
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
