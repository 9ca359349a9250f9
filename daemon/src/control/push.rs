//! Receiving an operator's push: offer → blobs → commit, as the tokio shell around the
//! [`PushSessions`] core.
//!
//! Nothing from a push enters the store before its manifest is admitted (signature, trusted
//! key, version newer than any seen for the name); a blob is accepted only if the admitted
//! manifest names it and its bytes hash to that name. Partial uploads persist in the store's
//! `tmp/` ([`Partial::PushUpload`]), so an interrupted push resumes where it stopped.

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Result, anyhow};
use edged_artifacts::{Partial, StoreError};
use edged_control::signing::SignedManifest;
use edged_control::wire::NeededBlob;
use tokio_util::sync::CancellationToken;

use super::push_session::PushSessions;
use crate::deployments::Deployments;
use crate::events::DeploymentSource;
use crate::lock::lock;

/// Uploads ask the kernel to start writing back every this many bytes, so the fsync at the end
/// of a blob waits for the tail only instead of the whole blob (disk and network overlap).
const WRITEBACK_EVERY: u64 = 8 << 20;

pub struct Pushes {
    deployments: Arc<Deployments>,
    state: Arc<Mutex<PushState>>,
}

#[derive(Default)]
struct PushState {
    sessions: PushSessions,
    /// Per blob being written: the lock that gives its writers their turn at the partial file.
    turns: HashMap<String, Arc<tokio::sync::Mutex<()>>>,
    /// Per writer generation: how to stop its stream when a newer writer supersedes it.
    cancels: HashMap<u64, CancellationToken>,
}

/// A writer's exclusive turn at a blob's partial file. Held until the file is adopted into the
/// store (even if the client goes away meanwhile); on drop the writer is released while the
/// lock is still held, so a later writer either waits for this turn or finds the blob stored.
struct WriterTurn {
    state: Arc<Mutex<PushState>>,
    hash: String,
    generation: u64,
    _lock: tokio::sync::OwnedMutexGuard<()>,
}

impl Drop for WriterTurn {
    fn drop(&mut self) {
        let mut state = lock(&self.state);
        state.cancels.remove(&self.generation);
        if state.sessions.release_writer(&self.hash, self.generation) {
            state.turns.remove(&self.hash);
        }
    }
}

impl Pushes {
    pub fn new(deployments: Arc<Deployments>) -> Pushes {
        Pushes {
            deployments,
            state: Arc::default(),
        }
    }

    /// Admits an offered manifest and answers with the blobs this node still needs (and how
    /// much of each arrived in an earlier, interrupted push).
    pub fn offer(&self, signed: SignedManifest) -> Result<Vec<NeededBlob>> {
        self.deployments.admit(&signed)?;
        let id = signed.payload.id();
        let needed = self.deployments.needed_blobs(&signed.payload);
        let store = self.deployments.store();
        let blobs = needed
            .values()
            .map(|(blob, _)| NeededBlob {
                blob: blob.clone(),
                have: store
                    .partial_len(Partial::PushUpload(&blob.blake3))
                    .min(blob.size),
            })
            .collect();
        tracing::info!(deployment = %id, signer = %signed.signer, "offer accepted");
        let expired = lock(&self.state)
            .sessions
            .offer(signed, needed, Instant::now());
        if expired > 0 {
            tracing::info!(offers = expired, "dropped abandoned push offers");
        }
        Ok(blobs)
    }

    /// Receives blob `hash` of offer `manifest_id` from `offset` on `recv`, then makes it
    /// durable, checks it and moves it into the store.
    pub async fn put_blob(
        &self,
        manifest_id: &str,
        hash: &str,
        offset: u64,
        recv: &mut quinn::RecvStream,
    ) -> Result<()> {
        let (blob, kind, generation, cancelled, turn_lock) = {
            let mut state = lock(&self.state);
            let (blob, kind) = state.sessions.blob(manifest_id, hash)?;
            let claim = state.sessions.claim_writer(hash);
            if let Some(old) = claim.superseded.and_then(|g| state.cancels.remove(&g)) {
                old.cancel();
            }
            let cancel = CancellationToken::new();
            state.cancels.insert(claim.generation, cancel.clone());
            let turn_lock = state.turns.entry(hash.to_string()).or_default().clone();
            (blob, kind, claim.generation, cancel, turn_lock)
        };
        let turn = WriterTurn {
            state: self.state.clone(),
            hash: hash.to_string(),
            generation,
            _lock: turn_lock.lock_owned().await,
        };
        let store = self.deployments.store().clone();
        if store.blob_meta(hash)?.is_some() {
            // A previous stream finished it while this one waited.
            return Ok(());
        }
        let partial = store.partial_path(Partial::PushUpload(hash));
        let have = store.partial_len(Partial::PushUpload(hash));
        PushSessions::check_resume(hash, offset, have, blob.size)?;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&partial)?;
        // Bytes past `offset` arrived after the client's offer (a dying stream): the client
        // sends them again, so drop them rather than append a second copy.
        file.set_len(offset)?;
        let mut remaining = blob.size - offset;
        let mut written = offset;
        let mut flushed = offset;
        while remaining > 0 {
            let chunk = tokio::select! {
                chunk = recv.read_chunk(remaining.min(1 << 20) as usize, true) => chunk?,
                () = cancelled.cancelled() => {
                    anyhow::bail!("upload of blob {hash} superseded by a newer stream for it")
                }
            }
            .ok_or_else(|| anyhow!("stream ended with {remaining} bytes of blob {hash} missing"))?;
            if let Err(e) = file.write_all(&chunk.bytes) {
                return Err(upload_failed(&store, &partial, hash, written, blob.size, e));
            }
            remaining -= chunk.bytes.len() as u64;
            written += chunk.bytes.len() as u64;
            if written - flushed >= WRITEBACK_EVERY {
                start_writeback(&file, flushed, written - flushed);
                flushed = written;
            }
        }
        // The partial file already sits in the store's tmp/: made durable, checked and renamed
        // into place, no second copy. A blob whose bytes do not match its name is deleted, never
        // stored. Off the async threads: fsync and hashing 50 MB would stall HTTP serving.
        let expected = hash.to_string();
        let blob_size = blob.size;
        tokio::task::spawn_blocking(move || {
            let _turn = turn;
            if let Err(e) = file.sync_all() {
                return Err(upload_failed(
                    &store, &partial, &expected, blob_size, blob_size, e,
                ));
            }
            drop(file);
            store
                .adopt_blob_file(&partial, kind, &expected)
                .map_err(|e| match e {
                    StoreError::HashMismatch { expected, actual } => anyhow!(
                        "blob bytes hash to {actual}, not to {expected} as the manifest says: \
                         refused, nothing stored"
                    ),
                    other => other.into(),
                })
        })
        .await??;
        Ok(())
    }

    /// Stores offer `manifest_id` once all its blobs are here, and activates it if asked.
    pub async fn commit(&self, manifest_id: &str, activate: bool) -> Result<()> {
        let signed = lock(&self.state)
            .sessions
            .ready_to_commit(manifest_id, |hash| self.deployments.holds_blob(hash))?;
        let committed = self
            .deployments
            .commit(&signed, DeploymentSource::Push, activate)
            .await;
        // Forgotten whatever the outcome: a client that retries offers again.
        lock(&self.state).sessions.committed(manifest_id);
        committed
    }
}

/// The error for a failed write of blob `hash`'s partial upload at byte `at` of `size`. When the
/// disk is full every partial push upload is removed (this one and its siblings, which cannot
/// finish either): kept, they would hold space every later push needs, and the operator's retry,
/// once there is room, sends them again. Any other failure keeps the partial for the retry to
/// resume.
fn upload_failed(
    store: &edged_artifacts::Store,
    partial: &std::path::Path,
    hash: &str,
    at: u64,
    size: u64,
    e: std::io::Error,
) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::StorageFull {
        // `partial` is one of them (`tmp/upload-<hash>`).
        let (files, bytes) = store.drop_push_uploads();
        tracing::warn!(blob = %hash, at, size, files, bytes, "the state disk is full: partial push uploads dropped");
        anyhow!(
            "the node's state disk is full: blob {hash} stopped at byte {at} of {size}; its \
             partial upload was removed so it holds no space (nothing stored was lost). Free \
             space on the node (`edged verify` shows what the store holds) and push again"
        )
    } else {
        anyhow!(
            "writing blob {hash} at byte {at} of {size} to {}: {e}",
            partial.display()
        )
    }
}

/// Starts asynchronous writeback of `len` bytes at `offset` of `file` (does not wait for it).
fn start_writeback(file: &std::fs::File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: sync_file_range(2) on a file descriptor we own, with plain integer arguments. It
    // is only a hint: the fsync before the blob is adopted is what makes it durable.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}
