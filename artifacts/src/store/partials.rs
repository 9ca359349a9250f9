//! Resumable partial blob files in `tmp/` ([`Partial`]): where each lives, how much of it is
//! on disk, and expiring the abandoned ones.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{Store, StoreError, io_err};

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

impl Store {
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

    /// Removes partial uploads (`tmp/` files other than in-progress puts) untouched for
    /// `max_age`: a push abandoned for that long will not resume, and an edge box's disk is
    /// small. Returns how many files and bytes were removed.
    pub fn expire_partials(&self, max_age: Duration) -> Result<(usize, u64), StoreError> {
        expire_partials_in(&self.root.join("tmp"), max_age)
    }

    /// Removes every partial push upload (`tmp/upload-*`): what a full disk calls for, since
    /// none of them can grow. Returns how many files and bytes went.
    pub fn drop_push_uploads(&self) -> (usize, u64) {
        let tmp = self.root.join("tmp");
        let Ok(entries) = fs::read_dir(&tmp) else {
            return (0, 0);
        };
        let (mut files, mut bytes) = (0, 0);
        for entry in entries.flatten() {
            if !entry.file_name().to_string_lossy().starts_with("upload-") {
                continue;
            }
            let len = entry.metadata().map(|m| m.len()).unwrap_or(0);
            if fs::remove_file(entry.path()).is_ok() {
                files += 1;
                bytes += len;
            }
        }
        (files, bytes)
    }

    /// Partial uploads and fetches on disk now: files and bytes (for `edged verify`).
    pub fn partials_usage(&self) -> (usize, u64) {
        let tmp = self.root.join("tmp");
        let Ok(entries) = fs::read_dir(&tmp) else {
            return (0, 0);
        };
        let (mut files, mut bytes) = (0, 0);
        for entry in entries.flatten().filter(|e| !is_put(e)) {
            let Ok(meta) = entry.metadata() else { continue };
            let (n, size) = usage(&entry.path(), &meta);
            files += n;
            bytes += size;
        }
        (files, bytes)
    }
}

/// [`Store::expire_partials`] on the `tmp/` directory of a store, open or not (a store that
/// cannot open for want of space frees its partials first).
pub(super) fn expire_partials_in(
    tmp: &Path,
    max_age: Duration,
) -> Result<(usize, u64), StoreError> {
    let (mut files, mut bytes) = (0, 0);
    for entry in fs::read_dir(tmp).map_err(io_err("list", tmp))? {
        let entry = entry.map_err(io_err("list", tmp))?;
        if is_put(&entry) {
            continue;
        }
        let Ok(meta) = entry.metadata() else { continue };
        // A blob fetched piecewise (`sync-<hash>.pieces/`) is a directory whose time is that
        // of its newest piece, so it is idle only when no piece arrived for that long.
        let idle = meta
            .modified()
            .ok()
            .and_then(|t| t.elapsed().ok())
            .unwrap_or_default();
        if idle < max_age || !(meta.is_file() || meta.is_dir()) {
            continue;
        }
        let path = entry.path();
        let (n, size) = usage(&path, &meta);
        let removed = if meta.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        if removed.is_ok() {
            files += n;
            bytes += size;
        }
    }
    Ok((files, bytes))
}

/// An in-progress put (`put-*`), which is no partial: its writer renames or removes it.
fn is_put(entry: &fs::DirEntry) -> bool {
    entry.file_name().to_string_lossy().starts_with("put-")
}

/// Files and bytes of one partial at `path`: a file, or a piece directory and its pieces.
fn usage(path: &Path, meta: &fs::Metadata) -> (usize, u64) {
    if meta.is_dir() {
        dir_usage(path)
    } else {
        (1, meta.len())
    }
}

/// Files and bytes under `dir` (one level: piece directories hold only files).
fn dir_usage(dir: &Path) -> (usize, u64) {
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .fold((0, 0), |(n, b), m| (n + 1, b + m.len()))
        })
        .unwrap_or((0, 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_piece_directory_expires_with_its_pieces() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let pieces = dir.path().join("tmp").join("sync-ab.pieces");
        fs::create_dir_all(&pieces).unwrap();
        fs::write(pieces.join("0"), vec![1u8; 1000]).unwrap();
        fs::write(pieces.join("1"), vec![1u8; 24]).unwrap();
        // Not idle long enough: kept.
        assert_eq!(
            store.expire_partials(Duration::from_secs(3600)).unwrap(),
            (0, 0)
        );
        assert!(pieces.exists());
        fs::write(dir.path().join("tmp").join("upload-cd"), vec![1u8; 10]).unwrap();
        assert_eq!(store.partials_usage(), (3, 1034));
        assert_eq!(store.expire_partials(Duration::ZERO).unwrap(), (3, 1034));
        assert!(!pieces.exists());
        assert_eq!(store.partials_usage(), (0, 0));
    }
}
