//! Verified streaming of blobs between nodes, for sync.
//!
//! A peer is never trusted for content: a node fetches a blob only because a manifest signed by
//! a trusted operator names its BLAKE3 hash, and checks every 1 KiB chunk against that hash as it
//! arrives (Bao slices: the content interleaved with the hash-tree nodes needed to verify each
//! chunk), so a flipped byte is caught at the chunk where it arrives, not after 50 MB.
//!
//! Content reaches the partial file only after its chunk verified, so a partial file is always
//! a verified prefix of the blob: the resume point for the next attempt, from the same peer or
//! another, after a peer dies or the daemon restarts.

use std::fs::File;
use std::io::{self, Cursor, Read, Seek, SeekFrom, Write};
use std::path::Path;

/// BLAKE3's chunk size: the unit in which content is verified and resumed.
pub const CHUNK: u64 = 1024;

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(
        "bad data at byte {offset} of blob {hash}: the chunk there does not verify against its \
         BLAKE3 hash"
    )]
    BadChunk { hash: String, offset: u64 },
    #[error("blob {hash}: stream ended after {offset} of {size} bytes")]
    Truncated {
        hash: String,
        offset: u64,
        size: u64,
    },
    #[error("blob {hash}: {hash_problem}")]
    BadHash { hash: String, hash_problem: String },
    #[error("blob {hash}: start {start} is past its {size} bytes")]
    BadStart { hash: String, start: u64, size: u64 },
    #[error("partial file: {0}")]
    Io(#[from] io::Error),
}

/// The Bao slice of `blob` from byte `start` to its end, as a reader: what a node sends a peer
/// that asked for the blob from `start` on. Builds the hash tree (one pass over the blob) once.
pub struct SliceSource<B: AsRef<[u8]>> {
    extractor: bao::encode::SliceExtractor<Cursor<B>, Cursor<Vec<u8>>>,
}

impl<B: AsRef<[u8]>> SliceSource<B> {
    pub fn new(blob: B, start: u64) -> SliceSource<B> {
        Self::build(blob, start).0
    }

    /// Like [`SliceSource::new`], but refuses a blob that does not hash to `hash`: a node never
    /// knowingly serves a damaged copy (the tree it builds is a full hash of the blob anyway).
    pub fn checked(blob: B, hash: &str, start: u64) -> Result<SliceSource<B>, VerifyError> {
        let expected = parse_hash(hash)?;
        let (source, actual) = Self::build(blob, start);
        if actual != expected {
            return Err(VerifyError::BadChunk {
                hash: hash.to_string(),
                offset: 0,
            });
        }
        Ok(source)
    }

    fn build(blob: B, start: u64) -> (SliceSource<B>, blake3::Hash) {
        let len = blob.as_ref().len() as u64;
        let (outboard, hash) = bao::encode::outboard(blob.as_ref());
        let start = start.min(len);
        let source = SliceSource {
            extractor: bao::encode::SliceExtractor::new_outboard(
                Cursor::new(blob),
                Cursor::new(outboard),
                start,
                len - start,
            ),
        };
        (source, hash)
    }
}

impl<B: AsRef<[u8]>> Read for SliceSource<B> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.extractor.read(buf)
    }
}

/// Opens (creating it if needed) the partial download at `path` for appending, and returns it
/// with the offset to resume from: its length rounded down to a whole chunk, where the file is
/// truncated, so what follows is appended at a chunk boundary.
pub fn open_partial(path: &Path) -> io::Result<(File, u64)> {
    let mut partial = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)?;
    let len = partial.metadata()?.len();
    let start = len / CHUNK * CHUNK;
    if start != len {
        partial.set_len(start)?;
    }
    partial.seek(SeekFrom::Start(start))?;
    Ok((partial, start))
}

fn parse_hash(hash: &str) -> Result<blake3::Hash, VerifyError> {
    blake3::Hash::from_hex(hash).map_err(|e| VerifyError::BadHash {
        hash: hash.to_string(),
        hash_problem: e.to_string(),
    })
}

/// Reads the Bao slice of blob `hash` (`size` bytes, as its manifest says) from `start` on out of
/// `slice`, appending verified content to `partial`, which must hold exactly the first `start`
/// bytes (see [`open_partial`]). `progress` is told each verified byte count as it is written.
/// On a bad chunk or a short stream, `partial` keeps everything verified so far.
pub fn receive_slice(
    slice: impl Read,
    hash: &str,
    size: u64,
    start: u64,
    partial: &mut File,
    mut progress: impl FnMut(u64),
) -> Result<(), VerifyError> {
    let expected = parse_hash(hash)?;
    if start > size {
        return Err(VerifyError::BadStart {
            hash: hash.to_string(),
            start,
            size,
        });
    }
    let mut decoder = bao::decode::SliceDecoder::new(slice, &expected, start, size - start);
    let mut offset = start;
    let mut buf = vec![0u8; 64 << 10];
    // The decoder hands out about one chunk per read; batch the writes. Everything verified is
    // flushed before returning, on every path, so the partial file stays the verified prefix.
    let mut partial = io::BufWriter::with_capacity(1 << 20, partial);
    loop {
        let n = match decoder.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                partial.flush()?;
                return Err(VerifyError::BadChunk {
                    hash: hash.to_string(),
                    offset,
                });
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                partial.flush()?;
                return Err(VerifyError::Truncated {
                    hash: hash.to_string(),
                    offset,
                    size,
                });
            }
            Err(e) => {
                partial.flush()?;
                return Err(e.into());
            }
        };
        partial.write_all(&buf[..n])?;
        offset += n as u64;
        progress(n as u64);
    }
    partial.flush()?;
    if offset != size {
        return Err(VerifyError::Truncated {
            hash: hash.to_string(),
            offset,
            size,
        });
    }
    Ok(())
}

/// The unit in which blobs move between nodes when they swarm: 256 Bao chunks. Each piece is
/// fetched as its own Bao slice, verified against the blob's signed BLAKE3 hash on arrival, and
/// may be served to other nodes from then on, before the blob is whole.
pub const PIECE: u64 = 256 * CHUNK;

/// How many pieces a blob of `size` bytes has (an empty blob has one, empty).
pub fn piece_count(size: u64) -> u32 {
    size.div_ceil(PIECE).max(1) as u32
}

/// Byte range `(start, len)` of piece `index` of a blob of `size` bytes; the last is shorter.
pub fn piece_range(size: u64, index: u32) -> (u64, u64) {
    let start = (index as u64 * PIECE).min(size);
    (start, (size - start).min(PIECE))
}

/// A whole blob's Bao tree, built once (one pass over the blob) and kept while the blob is
/// served piecewise: each piece's slice is then extracted without hashing the blob again.
pub struct PieceSource<B: AsRef<[u8]>> {
    blob: B,
    outboard: Vec<u8>,
}

impl<B: AsRef<[u8]>> PieceSource<B> {
    /// Refuses a blob that does not hash to `hash`: a node never knowingly serves a damaged
    /// copy.
    pub fn checked(blob: B, hash: &str) -> Result<PieceSource<B>, VerifyError> {
        let expected = parse_hash(hash)?;
        let (outboard, actual) = bao::encode::outboard(blob.as_ref());
        if actual != expected {
            return Err(VerifyError::BadChunk {
                hash: hash.to_string(),
                offset: 0,
            });
        }
        Ok(PieceSource { blob, outboard })
    }

    pub fn size(&self) -> u64 {
        self.blob.as_ref().len() as u64
    }

    /// Bytes kept besides the blob itself (the tree: about 6 % of the blob).
    pub fn tree_bytes(&self) -> usize {
        self.outboard.len()
    }

    /// The Bao slice of piece `index`: what a node sends a peer that asked for that piece.
    pub fn piece_slice(&self, index: u32) -> io::Result<Vec<u8>> {
        let (start, len) = piece_range(self.size(), index);
        let mut extractor = bao::encode::SliceExtractor::new_outboard(
            Cursor::new(self.blob.as_ref()),
            Cursor::new(&self.outboard[..]),
            start,
            len,
        );
        let mut slice = Vec::with_capacity(len as usize + len as usize / 16 + 1024);
        extractor.read_to_end(&mut slice)?;
        Ok(slice)
    }
}

/// Verifies the Bao slice of piece `index` of blob `hash` (`size` bytes, as its manifest says)
/// and returns the piece's content. Nothing of a slice counts unless all of it verifies.
pub fn verify_piece(
    slice: &[u8],
    hash: &str,
    size: u64,
    index: u32,
) -> Result<Vec<u8>, VerifyError> {
    let expected = parse_hash(hash)?;
    if index >= piece_count(size) {
        return Err(VerifyError::BadStart {
            hash: hash.to_string(),
            start: index as u64 * PIECE,
            size,
        });
    }
    let (start, len) = piece_range(size, index);
    let mut decoder = bao::decode::SliceDecoder::new(slice, &expected, start, len);
    let mut content = Vec::with_capacity(len as usize);
    match decoder.read_to_end(&mut content) {
        Ok(_) if content.len() as u64 == len => Ok(content),
        Ok(_) => Err(VerifyError::Truncated {
            hash: hash.to_string(),
            offset: start + content.len() as u64,
            size,
        }),
        Err(e) if e.kind() == io::ErrorKind::InvalidData => Err(VerifyError::BadChunk {
            hash: hash.to_string(),
            offset: start + content.len() as u64 / CHUNK * CHUNK,
        }),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(VerifyError::Truncated {
            hash: hash.to_string(),
            offset: start + content.len() as u64,
            size,
        }),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(len: usize) -> Vec<u8> {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn slice(blob: &[u8], start: u64) -> Vec<u8> {
        let mut out = Vec::new();
        SliceSource::new(blob, start).read_to_end(&mut out).unwrap();
        out
    }

    #[test]
    fn whole_blob_round_trips_with_little_overhead() {
        let data = blob(3 << 20);
        let hash = blake3::hash(&data).to_hex().to_string();
        let encoded = slice(&data, 0);
        // 64 bytes of tree per KiB of content, roughly.
        assert!(encoded.len() < data.len() + data.len() / 15);
        let dir = tempfile::tempdir().unwrap();
        let mut partial = File::create(dir.path().join("p")).unwrap();
        let mut seen = 0;
        receive_slice(
            &encoded[..],
            &hash,
            data.len() as u64,
            0,
            &mut partial,
            |n| seen += n,
        )
        .unwrap();
        assert_eq!(seen, data.len() as u64);
        assert_eq!(std::fs::read(dir.path().join("p")).unwrap(), data);
    }

    #[test]
    fn a_flipped_byte_is_caught_at_its_chunk_and_the_rest_resumes_from_another_source() {
        let data = blob(2 << 20);
        let hash = blake3::hash(&data).to_hex().to_string();
        let size = data.len() as u64;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p");
        let (mut partial, start) = open_partial(&path).unwrap();
        assert_eq!(start, 0);

        // A lying peer: serves the right tree but flips one content byte deep in the blob. The
        // slice interleaves tree nodes with content, so find that content byte by value.
        let bad_at = 700_000u64;
        let mut lie = slice(&data, 0);
        let window = &data[bad_at as usize..bad_at as usize + 64];
        let pos = lie
            .windows(64)
            .position(|w| w == window)
            .expect("content appears in the slice");
        lie[pos] ^= 0x01;
        let err = receive_slice(&lie[..], &hash, size, 0, &mut partial, |_| {}).unwrap_err();
        let VerifyError::BadChunk { offset, .. } = err else {
            panic!("expected a bad chunk, got {err}");
        };
        // Caught at the chunk group holding the byte (bao verifies 1 KiB chunks; the decoder
        // may hand out content only after checking it), never after the whole blob.
        assert!(offset <= bad_at && bad_at - offset < 16 * CHUNK, "{offset}");
        let kept = std::fs::read(&path).unwrap();
        assert_eq!(
            kept,
            data[..kept.len()],
            "only verified content was written"
        );

        // An honest peer continues from the verified prefix.
        let (mut partial, start) = open_partial(&path).unwrap();
        assert_eq!(start % CHUNK, 0);
        let honest = slice(&data, start);
        receive_slice(&honest[..], &hash, size, start, &mut partial, |_| {}).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), data);
    }

    #[test]
    fn truncated_streams_keep_a_verified_prefix_and_wrong_blobs_fail_at_once() {
        let data = blob(300_000);
        let hash = blake3::hash(&data).to_hex().to_string();
        let size = data.len() as u64;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p");

        // The peer dies half-way.
        let encoded = slice(&data, 0);
        let mut partial = File::create(&path).unwrap();
        let err = receive_slice(
            &encoded[..encoded.len() / 2],
            &hash,
            size,
            0,
            &mut partial,
            |_| {},
        )
        .unwrap_err();
        assert!(matches!(err, VerifyError::Truncated { .. }), "{err}");
        let kept = std::fs::read(&path).unwrap();
        assert!(!kept.is_empty() && kept.len() < data.len());
        assert_eq!(kept, data[..kept.len()]);

        // A different blob under the expected name fails at its first chunk.
        let other = blob(300_001);
        let mut partial = File::create(dir.path().join("q")).unwrap();
        let err =
            receive_slice(&slice(&other, 0)[..], &hash, size, 0, &mut partial, |_| {}).unwrap_err();
        assert!(
            matches!(err, VerifyError::BadChunk { offset: 0, .. }),
            "{err}"
        );
        assert_eq!(std::fs::metadata(dir.path().join("q")).unwrap().len(), 0);
    }

    #[test]
    fn pieces_cover_a_blob_and_the_last_is_shorter() {
        let size = 2 * PIECE + 5000;
        assert_eq!(piece_count(size), 3);
        assert_eq!(piece_range(size, 0), (0, PIECE));
        assert_eq!(piece_range(size, 2), (2 * PIECE, 5000));
        assert_eq!(piece_count(0), 1);
        assert_eq!(piece_range(0, 0), (0, 0));
        assert_eq!(piece_count(PIECE), 1);
    }

    #[test]
    fn every_piece_verifies_on_its_own_and_rebuilds_the_blob() {
        let data = blob((3 * PIECE + 1234) as usize);
        let hash = blake3::hash(&data).to_hex().to_string();
        let source = PieceSource::checked(&data[..], &hash).unwrap();
        let mut rebuilt = Vec::new();
        // In any order: a piece needs nothing but its own slice and the signed hash.
        for index in [3, 1, 0, 2] {
            let slice = source.piece_slice(index).unwrap();
            let content = verify_piece(&slice, &hash, data.len() as u64, index).unwrap();
            let (start, len) = piece_range(data.len() as u64, index);
            assert_eq!(content, &data[start as usize..(start + len) as usize]);
            rebuilt.push((index, content));
        }
        rebuilt.sort_by_key(|(i, _)| *i);
        let whole: Vec<u8> = rebuilt.into_iter().flat_map(|(_, c)| c).collect();
        assert_eq!(whole, data);
        assert!(source.tree_bytes() < data.len() / 10);
    }

    #[test]
    fn a_flipped_byte_or_a_foreign_piece_is_refused() {
        let data = blob((2 * PIECE) as usize);
        let size = data.len() as u64;
        let hash = blake3::hash(&data).to_hex().to_string();
        let source = PieceSource::checked(&data[..], &hash).unwrap();
        let mut slice = source.piece_slice(1).unwrap();
        let at = slice.len() / 2;
        slice[at] ^= 1;
        assert!(matches!(
            verify_piece(&slice, &hash, size, 1),
            Err(VerifyError::BadChunk { .. })
        ));
        // Piece 0's slice offered as piece 1.
        let other = source.piece_slice(0).unwrap();
        assert!(verify_piece(&other, &hash, size, 1).is_err());
        // Cut short.
        let whole = source.piece_slice(1).unwrap();
        assert!(matches!(
            verify_piece(&whole[..whole.len() - 10], &hash, size, 1),
            Err(VerifyError::Truncated { .. })
        ));
        // A damaged copy is never served.
        let mut damaged = data.clone();
        damaged[5] ^= 1;
        assert!(PieceSource::checked(&damaged[..], &hash).is_err());
        assert!(verify_piece(&whole, &hash, size, 9).is_err());
    }
}
