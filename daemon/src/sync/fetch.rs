//! Fetching one blob from peers: the holder loop (driven by [`BlobFetch`]'s choices) and one
//! attempt with one peer, a Bao slice verified chunk by chunk into the store's resumable partial
//! file ([`Partial::PeerFetch`]). A partial download only ever holds verified bytes: after a
//! peer dies, or this daemon restarts, it resumes from there with any peer.

use std::io::{self, Read};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use bytes::Bytes;
use edged_artifacts::manifest::BlobRef;
use edged_artifacts::{BlobKind, Partial, StoreError};
use edged_control::transport::{read_frame, write_frame};
use edged_control::verified::{VerifyError, open_partial, receive_slice};
use edged_control::wire::{Request, Response};

use super::policy::{Attempt, BlobFetch, NextHolders};
use super::{REQUEST_TIMEOUT, Syncer, Transfer};
use crate::deployments::FetchMark;
use crate::lock::lock;

/// A transfer that makes no progress for this long is abandoned for another holder (a dead peer
/// would otherwise hold it until QUIC's 30 s idle timeout).
const STALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause before asking again when every holder of a blob is busy.
const BUSY_PAUSE: Duration = Duration::from_millis(200);

impl Syncer {
    fn blob_lock(&self, hash: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = lock(&self.blob_locks);
        locks.retain(|_, lock| Arc::strong_count(lock) > 1);
        locks.entry(hash.to_string()).or_default().clone()
    }

    fn peer_slots(&self, addr: &str) -> Arc<tokio::sync::Semaphore> {
        lock(&self.peer_slots)
            .entry(addr.to_string())
            .or_insert_with(|| {
                Arc::new(tokio::sync::Semaphore::new(
                    self.config.max_transfers_per_peer,
                ))
            })
            .clone()
    }

    /// Fetches one blob into the store from whichever holder can serve it, resuming the verified
    /// partial download across holders.
    pub(super) async fn fetch_blob(
        self: &Arc<Self>,
        id: &str,
        blob: &BlobRef,
        kind: BlobKind,
        published: Option<&oci_client::Reference>,
    ) -> Result<()> {
        let hash = &blob.blake3;
        let lock = self.blob_lock(hash);
        let _one_fetch_per_blob = lock.lock().await;
        if self.deployments.store().blob_meta(hash)?.is_some() {
            return Ok(());
        }
        let _transfer = self.transfers.acquire().await?;
        let mut plan = BlobFetch::new(hash, Instant::now());
        loop {
            let next = plan.next_source(&self.table(), published.is_some(), Instant::now());
            let holders = match next {
                NextHolders::Ask(holders) => holders,
                NextHolders::Registry => {
                    let (Some(origin), Some(pinned)) = (&self.origin, published) else {
                        unreachable!("the registry is offered only for a published deployment")
                    };
                    match origin.fetch_blob(pinned, id, blob, kind.clone()).await {
                        Ok(()) => {
                            self.metrics.fetch("ok");
                            return Ok(());
                        }
                        Err(e) => {
                            tracing::warn!(blob = %hash, deployment = %id, "no peer holds this blob and the registry could not deliver it: {e}");
                            plan.record_registry_failure();
                            continue;
                        }
                    }
                }
                NextHolders::Nobody => bail!(
                    "no reachable peer holds blob {hash} of {id} (failed: {:?})",
                    plan.failed()
                ),
            };
            for addr in &holders {
                let Ok(_peer_slot) = self.peer_slots(addr).try_acquire_owned() else {
                    continue;
                };
                let attempt = match self.fetch_from(addr, id, blob, &kind).await {
                    Ok(()) => {
                        self.metrics.fetch("ok");
                        return Ok(());
                    }
                    Err(attempt) => attempt,
                };
                match &attempt {
                    Attempt::Busy => self.metrics.fetch("busy"),
                    Attempt::BadData(reason) => {
                        self.metrics.fetch("bad_data");
                        self.report_penalty(addr, reason);
                    }
                    Attempt::Failed(reason) => {
                        self.metrics.fetch("failed");
                        tracing::info!(peer = %addr, blob = %hash, "fetch failed: {reason}; trying another holder");
                    }
                }
                // Penalties and failures go into the peer table through the plan.
                plan.record(&mut self.table(), addr, &attempt, Instant::now());
            }
            if plan.gave_up(Instant::now()) {
                bail!(
                    "every holder of blob {hash} stayed busy for {:?}",
                    super::policy::BUSY_GIVE_UP
                );
            }
            tokio::time::sleep(BUSY_PAUSE).await;
            // Holders change as other nodes finish: ask again.
            self.refresh_holdings().await;
        }
    }

    /// One attempt to fetch `blob` from `addr`, from the end of the verified partial download.
    async fn fetch_from(
        &self,
        addr: &str,
        id: &str,
        blob: &BlobRef,
        kind: &BlobKind,
    ) -> std::result::Result<(), Attempt> {
        let failed = |e: anyhow::Error| Attempt::Failed(format!("{e:#}"));
        let hash = blob.blake3.clone();
        let store = self.deployments.store().clone();
        let partial = store.partial_path(Partial::PeerFetch(&hash));
        let conn = self.connection(addr).await.map_err(failed)?;
        let (file, start) = open_partial(&partial)
            .map_err(|e| Attempt::Failed(format!("partial download {}: {e}", partial.display())))?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| failed(e.into()))?;
        let request = Request::FetchBlob {
            hash: hash.clone(),
            start,
        };
        let answer = tokio::time::timeout(REQUEST_TIMEOUT, async {
            write_frame(&mut send, &request).await?;
            send.finish()?;
            anyhow::Ok(read_frame::<Response>(&mut recv).await?)
        })
        .await
        .map_err(|_| Attempt::Failed(format!("{addr} did not answer within {REQUEST_TIMEOUT:?}")))?
        .map_err(failed)?;
        match answer {
            Response::BlobSlice { size } if size == blob.size => {}
            Response::BlobSlice { size } => {
                return Err(Attempt::BadData(format!(
                    "says blob {hash} has {size} bytes; the signed manifest says {}",
                    blob.size
                )));
            }
            Response::Busy { .. } => return Err(Attempt::Busy),
            Response::Error { message } => return Err(Attempt::Failed(message)),
            other => return Err(Attempt::Failed(format!("unexpected answer {other:?}"))),
        }
        if start > 0 {
            tracing::info!(peer = %addr, blob = %hash, start, "resuming a partial download");
        }
        let have = Arc::new(AtomicU64::new(start));
        let _progress = self.track(&hash, id, addr, blob.size, have.clone());

        // The network side stays async (stall detection, pacing); verification and disk writes
        // run on a blocking thread fed through a channel.
        let (chunks_tx, chunks_rx) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(16);
        let verifier = {
            let (hash, size, kind) = (hash.clone(), blob.size, kind.clone());
            let have = have.clone();
            tokio::task::spawn_blocking(move || -> std::result::Result<(), FetchError> {
                let mut file = file;
                let reader = ChannelReader {
                    chunks: chunks_rx,
                    current: Bytes::new(),
                };
                receive_slice(reader, &hash, size, start, &mut file, |n| {
                    have.fetch_add(n, Ordering::Relaxed);
                })?;
                file.sync_all()?;
                drop(file);
                // Hash and kind are checked once more as the file is renamed into the store.
                store.adopt_blob_file(&partial, kind, &hash)?;
                Ok(())
            })
        };
        let fetched_bytes = self.metrics.fetched_from(addr);
        loop {
            let chunk =
                match tokio::time::timeout(STALL_TIMEOUT, recv.read_chunk(256 << 10, true)).await {
                    Err(_) => Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("{addr} sent nothing for {STALL_TIMEOUT:?}"),
                    )),
                    Ok(Ok(Some(chunk))) => Ok(chunk.bytes),
                    Ok(Ok(None)) => break,
                    Ok(Err(e)) => Err(io::Error::other(e)),
                };
            let ended = chunk.is_err();
            if let Ok(bytes) = &chunk {
                fetched_bytes.inc_by(bytes.len() as u64);
                self.fetched_bytes
                    .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                self.pacer.moved_async(bytes.len() as u64).await;
            }
            if chunks_tx.send(chunk).await.is_err() || ended {
                break; // the verifier stopped (bad data), or the stream failed
            }
        }
        drop(chunks_tx);
        let verified = verifier
            .await
            .map_err(|e| Attempt::Failed(format!("verifier task: {e}")))?;
        match verified {
            Ok(()) => {
                tracing::info!(peer = %addr, blob = %hash, bytes = blob.size - start, "blob fetched and verified");
                Ok(())
            }
            Err(e @ FetchError::Verify(VerifyError::BadChunk { .. })) => {
                Err(Attempt::BadData(e.to_string()))
            }
            Err(e) => Err(Attempt::Failed(e.to_string())),
        }
    }

    /// Registers a transfer for status and holdings; unregistered when the guard drops.
    fn track(
        &self,
        hash: &str,
        id: &str,
        addr: &str,
        size: u64,
        have: Arc<AtomicU64>,
    ) -> TransferGuard<'_> {
        lock(&self.in_progress).insert(
            hash.to_string(),
            Transfer {
                deployment: id.to_string(),
                peer: addr.to_string(),
                have,
                size,
            },
        );
        self.metrics.transfers.inc();
        TransferGuard {
            syncer: self,
            hash: hash.to_string(),
            _fetching: self.deployments.begin_fetch(hash),
        }
    }
}

struct TransferGuard<'a> {
    syncer: &'a Syncer,
    hash: String,
    _fetching: FetchMark,
}

impl Drop for TransferGuard<'_> {
    fn drop(&mut self) {
        lock(&self.syncer.in_progress).remove(&self.hash);
        self.syncer.metrics.transfers.dec();
    }
}

#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error(transparent)]
    Verify(#[from] VerifyError),
    #[error("partial download: {0}")]
    Io(#[from] io::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The fetched stream as a blocking reader for the Bao decoder.
struct ChannelReader {
    chunks: tokio::sync::mpsc::Receiver<io::Result<Bytes>>,
    current: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.chunks.blocking_recv() {
                Some(chunk) => self.current = chunk?,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current = self.current.slice(n..);
        Ok(n)
    }
}
