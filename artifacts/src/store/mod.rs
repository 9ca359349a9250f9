//! The content-addressed store: immutable BLAKE3-named blob files plus a sled index.
//!
//! This module holds the [`Store`] type, [`Store::open`] with its index identity check,
//! [`StoreError`] and the helpers the parts share. The parts:
//!
//! - `blobs`: putting, adopting, checking, quarantining, reading and mapping blob files
//!   ([`BlobKind`], [`BlobMeta`]);
//! - `index`: manifests, signatures, published refs, activations and compile records in the
//!   index, and how their keys are encoded;
//! - `partials`: resumable partial files in `tmp/` ([`Partial`]) and their expiry;
//! - `housekeeping`: references, `gc`, stray files, `verify` ([`VerifyReport`], [`GcReport`]).
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

mod blobs;
mod housekeeping;
mod index;
mod partials;

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use edged_compiler::content_hash;

pub use blobs::{BlobKind, BlobMeta};
pub use housekeeping::{GcReport, VerifyReport};
pub use partials::Partial;

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
    #[error(
        "the disk holding the store in {root} is full: its index {index} could not be opened for \
         writing (even after the {freed_bytes} bytes of partial uploads and fetches in {root}/tmp \
         were dropped). The index is most likely intact: do not move it aside. Free space on that \
         disk and start again"
    )]
    DiskFull {
        root: PathBuf,
        index: PathBuf,
        freed_bytes: u64,
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

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn is_blob_name(name: &str) -> bool {
    name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit())
}

fn fsync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", dir))
}

/// sled failed for want of space (ENOSPC).
fn is_disk_full(error: &sled::Error) -> bool {
    matches!(error, sled::Error::Io(e)
        if e.kind() == std::io::ErrorKind::StorageFull || e.raw_os_error() == Some(libc::ENOSPC))
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
        let open_index = || {
            sled::Config::new()
                .path(&index)
                .mode(sled::Mode::HighThroughput)
                .open()
        };
        let mut opened = open_index();
        let mut freed_bytes = 0;
        if opened.as_ref().is_err_and(is_disk_full) {
            // Partials are never the only copy of anything (a push or a fetch resumes or
            // starts again): drop them all to make room for the index, then try once more.
            let (files, bytes) = partials::expire_partials_in(&root.join("tmp"), Duration::ZERO)?;
            freed_bytes = bytes;
            tracing::warn!(
                store = %root.display(),
                files,
                bytes,
                "the store's disk is full: dropped every partial upload and fetch to open the index"
            );
            opened = open_index();
        }
        let db = opened.map_err(|source| match source {
            ref e if is_disk_full(e) => StoreError::DiskFull {
                root: root.clone(),
                index: index.clone(),
                freed_bytes,
            },
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
}
