//! A blob being fetched piecewise, on disk: each verified piece's Bao slice is kept as its own
//! file in `tmp/sync-<hash>.pieces/`, so the node can serve the pieces it has to other nodes
//! while it fetches the rest (the fleet swarms instead of waiting on the origin), a crash or
//! restart keeps every piece already verified, and the blob is assembled — and verified once
//! more — only when all pieces are in.
//!
//! A piece file exists only after its slice verified against the blob's signed BLAKE3 hash
//! (written under a temporary name, fsynced, renamed); what a restart finds is verified again
//! before it counts, so a damaged file is dropped and fetched again, never served.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use edged_artifacts::{BlobKind, Partial, Store, StoreError};
use edged_control::verified::{VerifyError, piece_count, verify_piece};

/// Why a piecewise blob could not be kept or assembled.
#[derive(Debug, thiserror::Error)]
pub enum PieceError {
    #[error(transparent)]
    Verify(#[from] VerifyError),
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("blob {hash}: piece {index} is missing")]
    Missing { hash: String, index: u32 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> PieceError {
    let path = path.to_path_buf();
    move |source| PieceError::Io {
        action,
        path,
        source,
    }
}

/// The pieces of one blob this node holds while it fetches it.
pub struct PieceFiles {
    dir: PathBuf,
    hash: String,
    size: u64,
}

impl PieceFiles {
    /// The piece directory of blob `hash` (`size` bytes), created if needed.
    pub fn open(store: &Store, hash: &str, size: u64) -> Result<PieceFiles, PieceError> {
        let dir = Self::dir_of(store, hash);
        fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        Ok(PieceFiles {
            dir,
            hash: hash.to_string(),
            size,
        })
    }

    /// The piece directory of blob `hash`, if this node is fetching it piecewise.
    pub fn existing(store: &Store, hash: &str, size: u64) -> Option<PieceFiles> {
        let dir = Self::dir_of(store, hash);
        dir.is_dir().then(|| PieceFiles {
            dir,
            hash: hash.to_string(),
            size,
        })
    }

    fn dir_of(store: &Store, hash: &str) -> PathBuf {
        let mut name = store
            .partial_path(Partial::PeerFetch(hash))
            .into_os_string();
        name.push(".pieces");
        PathBuf::from(name)
    }

    pub fn hash(&self) -> &str {
        &self.hash
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    fn path(&self, index: u32) -> PathBuf {
        self.dir.join(index.to_string())
    }

    /// The pieces on disk after a restart, each verified again; a file that fails (damage,
    /// a torn write) is removed so the piece is fetched again.
    pub fn verified_on_disk(&self) -> Vec<u32> {
        let mut held = Vec::new();
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return held;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(index) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
                // A temporary name from an interrupted write.
                let _ = fs::remove_file(entry.path());
                continue;
            };
            let good = fs::read(entry.path())
                .ok()
                .is_some_and(|slice| verify_piece(&slice, &self.hash, self.size, index).is_ok());
            if good {
                held.push(index);
            } else {
                tracing::warn!(blob = %self.hash, piece = index, "a stored piece does not verify; fetching it again");
                let _ = fs::remove_file(entry.path());
            }
        }
        held.sort_unstable();
        held
    }

    /// Verifies `slice` as piece `index` and keeps it. Returns the piece's content length.
    pub fn put(&self, index: u32, slice: &[u8]) -> Result<u64, PieceError> {
        let content = verify_piece(slice, &self.hash, self.size, index)?;
        let tmp = self.dir.join(format!(".{index}.tmp"));
        let mut file = fs::File::create(&tmp).map_err(io_err("create", &tmp))?;
        file.write_all(slice)
            .and_then(|()| file.sync_data())
            .map_err(io_err("write", &tmp))?;
        let path = self.path(index);
        fs::rename(&tmp, &path).map_err(io_err("rename into", &path))?;
        Ok(content.len() as u64)
    }

    /// The stored slice of piece `index`, as it is sent to a peer (it verified when stored).
    pub fn slice(&self, index: u32) -> Result<Vec<u8>, PieceError> {
        let path = self.path(index);
        fs::read(&path).map_err(io_err("read", &path))
    }

    /// Assembles the blob from its pieces (each verified once more on the way), stores it as
    /// `kind` (the store hashes it whole again) and removes the pieces.
    pub fn assemble(self, store: &Store, kind: BlobKind) -> Result<String, PieceError> {
        let out = store.partial_path(Partial::PeerFetch(&self.hash));
        let mut file = fs::File::create(&out).map_err(io_err("create", &out))?;
        for index in 0..piece_count(self.size) {
            let slice = fs::read(self.path(index)).map_err(|_| PieceError::Missing {
                hash: self.hash.clone(),
                index,
            })?;
            let content = verify_piece(&slice, &self.hash, self.size, index)?;
            file.write_all(&content).map_err(io_err("write", &out))?;
        }
        file.sync_all().map_err(io_err("fsync", &out))?;
        drop(file);
        let hash = store.adopt_blob_file(&out, kind, &self.hash)?;
        self.remove();
        Ok(hash)
    }

    /// Drops every piece (the blob is stored, or given up).
    pub fn remove(self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edged_control::verified::{PIECE, PieceSource};

    /// A valid module of about `len` bytes (the store accepts only Wasm as a source).
    fn blob(len: usize) -> Vec<u8> {
        edged_testkit::big_module(len, 7)
    }

    #[test]
    fn pieces_survive_a_restart_and_assemble_into_the_blob() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let data = blob((2 * PIECE + 777) as usize);
        assert!(piece_count(data.len() as u64) >= 3);
        let hash = edged_compiler::content_hash(&data);
        let size = data.len() as u64;
        let source = PieceSource::checked(&data[..], &hash).unwrap();
        let pieces = PieceFiles::open(&store, &hash, size).unwrap();
        pieces.put(2, &source.piece_slice(2).unwrap()).unwrap();
        pieces.put(0, &source.piece_slice(0).unwrap()).unwrap();
        // A piece that does not verify is refused and leaves nothing behind.
        let mut bad = source.piece_slice(1).unwrap();
        bad[100] ^= 1;
        assert!(pieces.put(1, &bad).is_err());
        drop(pieces);

        let reopened = PieceFiles::existing(&store, &hash, size).expect("still there");
        assert_eq!(reopened.verified_on_disk(), [0, 2]);
        assert_eq!(reopened.slice(2).unwrap(), source.piece_slice(2).unwrap());
        reopened.put(1, &source.piece_slice(1).unwrap()).unwrap();
        let stored = reopened.assemble(&store, BlobKind::Source).unwrap();
        assert_eq!(stored, hash);
        assert!(store.blob_meta(&hash).unwrap().is_some());
        assert!(PieceFiles::existing(&store, &hash, size).is_none());
    }

    #[test]
    fn a_damaged_piece_file_is_dropped_at_restart_and_a_missing_one_stops_assembly() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let data = blob((PIECE + 10) as usize);
        assert_eq!(piece_count(data.len() as u64), 2);
        let hash = edged_compiler::content_hash(&data);
        let size = data.len() as u64;
        let source = PieceSource::checked(&data[..], &hash).unwrap();
        let pieces = PieceFiles::open(&store, &hash, size).unwrap();
        pieces.put(0, &source.piece_slice(0).unwrap()).unwrap();
        pieces.put(1, &source.piece_slice(1).unwrap()).unwrap();
        let path = pieces.path(1);
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs::write(&path, bytes).unwrap();
        fs::write(pieces.dir.join(".7.tmp"), b"torn").unwrap();
        assert_eq!(pieces.verified_on_disk(), [0]);
        assert!(!path.exists());
        assert!(matches!(
            pieces.assemble(&store, BlobKind::Source),
            Err(PieceError::Missing { index: 1, .. })
        ));
    }
}
