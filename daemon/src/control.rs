//! The node's side of the QUIC control plane: mutual TLS against the fleet CA, roles from the
//! peer certificate, and the push protocol (offer → blobs → commit) plus list, status,
//! activate, rollback, remove and invoke.
//!
//! Nothing from a push enters the store before its manifest is verified (signature, trusted
//! key, version newer than any seen for the name); a blob is accepted only if the verified
//! manifest names it and its bytes hash to that name. Partial uploads persist in the store's
//! `tmp/` as `upload-<hash>`, so an interrupted push resumes where it stopped.
//!
//! Node certificates may ask what this node holds and fetch blobs from it (the serving side of
//! [`crate::sync`]); a node serves each blob to one peer at a time, within an upload cap, and
//! tells further fetchers it is busy.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use edged_control::identity::{self, Role, role_of};
use edged_control::signing::SignedManifest;
use edged_control::transport::{read_frame, write_frame};
use edged_control::verified::SliceSource;
use edged_control::wire::{DeploymentInfo, Holding, NeededBlob, NodeStatus, Request, Response};
use edged_control::{FleetIdentity, TrustedKeys};
use edged_node_config::{ControlConfig, SyncConfig};
use edged_snapshots::manifest::BlobRef;
use edged_snapshots::{BlobKind, Manifest, StoreError};

use tokio_util::sync::CancellationToken;

use crate::node::Node;
use crate::sync::Syncer;

/// An accepted offer waiting for its blobs.
struct Pending {
    signed: SignedManifest,
    offered_at: std::time::Instant,
    /// Blobs this node needs, by hash, with their kind.
    needed: BTreeMap<String, (BlobRef, BlobKind)>,
}

pub struct ControlPlane {
    node: Arc<Node>,
    trusted: TrustedKeys,
    node_name: String,
    pending: Mutex<HashMap<String, Pending>>,
    /// Blobs being received: one writer per partial file at a time.
    uploads: Arc<Mutex<HashMap<String, UploadWriter>>>,
    /// The client side of this node's fleet identity, for the syncer's outbound connections.
    client_config: quinn::ClientConfig,
    /// Deployments an operator pushed to this node (since it started): peers are steered to
    /// other holders, so this node uploads each blob about once.
    pushed_here: Mutex<HashSet<String>>,
    /// Deployments the syncer is fetching: their verified manifests, by id. Peers may already
    /// fetch the blobs that arrived.
    syncing: Mutex<BTreeMap<String, SignedManifest>>,
    serving_to_peers: Arc<UploadSlots>,
    syncer: OnceLock<Weak<Syncer>>,
}

/// Blobs being served to peers: each to one fetcher at a time, at most `max` at once.
struct UploadSlots {
    max: usize,
    /// By blob hash: the peer being served and how to stop serving it.
    active: Mutex<HashMap<String, ActiveUpload>>,
}

struct ActiveUpload {
    peer: String,
    generation: u64,
    cancel: CancellationToken,
}

/// One blob being served to a peer; frees its slot on drop.
struct UploadSlot {
    slots: Arc<UploadSlots>,
    hash: String,
    generation: u64,
    cancel: CancellationToken,
}

impl UploadSlots {
    /// A slot for serving `hash` to `peer`, or `None` when it is being served to another peer
    /// or the cap is reached. A node fetches each blob once at a time, so a second request from
    /// the same peer means its first stream is dead (a crashed daemon's streams linger until the
    /// idle timeout): that upload is cancelled and the new one takes its slot.
    fn try_take(self: &Arc<Self>, hash: &str, peer: &str) -> Option<UploadSlot> {
        let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        match active.get(hash) {
            Some(current) if current.peer == peer => current.cancel.cancel(),
            Some(_) => return None,
            None if active.len() >= self.max => return None,
            None => {}
        }
        let cancel = CancellationToken::new();
        let generation = UPLOAD_GENERATION.fetch_add(1, Ordering::Relaxed);
        active.insert(
            hash.to_string(),
            ActiveUpload {
                peer: peer.to_string(),
                generation,
                cancel: cancel.clone(),
            },
        );
        Some(UploadSlot {
            slots: self.clone(),
            hash: hash.to_string(),
            generation,
            cancel,
        })
    }
}

impl Drop for UploadSlot {
    fn drop(&mut self) {
        let mut active = self.slots.active.lock().unwrap_or_else(|p| p.into_inner());
        if active
            .get(&self.hash)
            .is_some_and(|a| a.generation == self.generation)
        {
            active.remove(&self.hash);
        }
    }
}

/// A peer that stops reading for this long loses its upload slot.
const UPLOAD_STALL: Duration = Duration::from_secs(15);

/// The writer of one partial upload. A newer upload of the same blob cancels the current one
/// and waits for its lock: after a client dies its stream lingers until the idle timeout, and
/// the operator's retry must not wait for that (nor may two streams append to one file).
#[derive(Clone)]
struct UploadWriter {
    lock: Arc<tokio::sync::Mutex<()>>,
    cancel: CancellationToken,
    generation: u64,
}

/// An upload's exclusive turn at its partial file. Held until the file is adopted into the store
/// (even if the client goes away meanwhile); on drop the writer is unregistered while the lock
/// is still held, so a later upload either waits for this turn or finds the blob stored.
struct UploadTurn {
    uploads: Arc<Mutex<HashMap<String, UploadWriter>>>,
    hash: String,
    generation: u64,
    _lock: tokio::sync::OwnedMutexGuard<()>,
}

impl Drop for UploadTurn {
    fn drop(&mut self) {
        let mut uploads = self.uploads.lock().unwrap_or_else(|p| p.into_inner());
        if uploads
            .get(&self.hash)
            .is_some_and(|w| w.generation == self.generation)
        {
            uploads.remove(&self.hash);
        }
    }
}

static UPLOAD_GENERATION: AtomicU64 = AtomicU64::new(0);

/// Creates the dev identity (throwaway fleet) if asked and missing.
pub fn ensure_dev_identity(config: &ControlConfig) -> Result<()> {
    if config.dev_identity && !config.identity_dir.join("ca.pem").exists() {
        identity::init_operator_dir(&config.identity_dir, "dev-operator")?;
        identity::issue_node_files(
            &config.identity_dir,
            &config.node_name,
            &config.identity_dir,
        )?;
        tracing::warn!(
            dir = %config.identity_dir.display(),
            "generated a throwaway dev fleet identity; do not use it in production"
        );
    }
    Ok(())
}

/// Binds the control endpoint; returns it with its bound address.
pub fn bind(
    node: Arc<Node>,
    config: &ControlConfig,
    sync: Option<&SyncConfig>,
) -> Result<(quinn::Endpoint, Arc<ControlPlane>)> {
    ensure_dev_identity(config)?;
    let fleet = FleetIdentity::load(&config.identity_dir, &config.node_name)?;
    let trusted = identity::trusted_keys(&config.trusted_keys)?;
    if trusted.is_empty() {
        tracing::warn!("no trusted operator keys: every push will be refused");
    }
    let endpoint = quinn::Endpoint::server(fleet.server_config()?, config.listen)
        .with_context(|| format!("binding QUIC control on {}", config.listen))?;
    let plane = Arc::new(ControlPlane {
        node,
        trusted,
        node_name: config.node_name.clone(),
        pending: Mutex::new(HashMap::new()),
        uploads: Arc::default(),
        client_config: fleet.client_config()?,
        pushed_here: Mutex::default(),
        syncing: Mutex::default(),
        serving_to_peers: Arc::new(UploadSlots {
            // Without [sync] the node still serves peers that list it, with the default cap.
            max: sync.map_or(2, |s| s.max_uploads),
            active: Mutex::default(),
        }),
        syncer: OnceLock::new(),
    });
    Ok((endpoint, plane))
}

/// Uploads ask the kernel to start writing back every this many bytes, so the fsync at the end
/// of a blob waits for the tail only instead of the whole blob (disk and network overlap).
const WRITEBACK_EVERY: u64 = 8 << 20;

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

impl ControlPlane {
    pub fn client_config(&self) -> quinn::ClientConfig {
        self.client_config.clone()
    }

    pub fn trusted(&self) -> &TrustedKeys {
        &self.trusted
    }

    /// Connects the syncer, which learns peers from inbound node connections and is told when
    /// a push commits.
    pub fn attach_syncer(&self, syncer: &Arc<Syncer>) {
        let _ = self.syncer.set(Arc::downgrade(syncer));
    }

    fn syncer(&self) -> Option<Arc<Syncer>> {
        self.syncer.get().and_then(Weak::upgrade)
    }

    pub async fn serve(self: Arc<Self>, endpoint: quinn::Endpoint) {
        while let Some(incoming) = endpoint.accept().await {
            let plane = self.clone();
            tokio::spawn(async move {
                if let Err(e) = plane.connection(incoming).await {
                    tracing::info!(error = %format!("{e:#}"), "control connection ended");
                }
            });
        }
    }

    async fn connection(self: Arc<Self>, incoming: quinn::Incoming) -> Result<()> {
        let remote = incoming.remote_address();
        // The TLS handshake fails here for a client certificate not from the fleet CA.
        let conn = incoming
            .await
            .with_context(|| format!("handshake with {remote} refused"))?;
        let certs = identity::peer_certificates(&conn)
            .ok_or_else(|| anyhow!("{remote} presented no certificate"))?;
        let leaf = certs
            .first()
            .ok_or_else(|| anyhow!("{remote}: empty certificate chain"))?;
        let role = match role_of(leaf) {
            Ok(role) => role,
            Err(e) => {
                conn.close(2u32.into(), b"certificate carries no edged role");
                bail!("{remote}: {e}");
            }
        };
        let peer = identity::common_name(leaf);
        tracing::info!(%remote, %peer, %role, "control connection");
        if role == Role::Node
            && let Some(syncer) = self.syncer()
        {
            // Peers sync from their control endpoint, so this is where they can be reached.
            syncer.learn_peer(remote, &peer);
        }
        // Each request stream is served on its own task: a push sends its blobs concurrently,
        // and a long upload must not hold up `status` or `ls` on the same connection.
        loop {
            let (send, recv) = match conn.accept_bi().await {
                Ok(streams) => streams,
                Err(quinn::ConnectionError::ApplicationClosed(_)) => return Ok(()),
                Err(e) => return Err(e.into()),
            };
            let (plane, conn, peer) = (self.clone(), conn.clone(), peer.clone());
            tokio::spawn(async move {
                if let Err(e) = plane.stream(&conn, role, &peer, send, recv).await {
                    tracing::info!(%peer, error = %format!("{e:#}"), "control stream ended");
                }
            });
        }
    }

    /// One request and its answer on one bidirectional stream.
    async fn stream(
        &self,
        conn: &quinn::Connection,
        role: Role,
        peer: &str,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) -> Result<()> {
        let request: Request = match read_frame(&mut recv).await {
            Ok(request) => request,
            Err(edged_control::transport::TransportError::Wire(e)) => {
                // A protocol violation ends the connection, never the daemon.
                tracing::warn!(%peer, error = %e, "bad control frame; closing the connection");
                let reason = e.to_string();
                conn.close(1u32.into(), reason.as_bytes());
                bail!("{peer}: {e}");
            }
            Err(e) => return Err(e.into()),
        };
        let response = match self.authorize(role, &request) {
            Ok(()) => match request {
                // The one answer followed by raw bytes: written by the handler itself.
                Request::FetchBlob { hash, start } => {
                    match self.serving_to_peers.try_take(&hash, peer) {
                        None => Response::Busy {
                            message: format!(
                                "already serving blob {hash} or at the upload cap; try another holder"
                            ),
                        },
                        Some(slot) => match self.fetch_blob(&hash, start, &mut send, slot).await {
                            Ok(()) => return Ok(()),
                            Err(e) => Response::Error {
                                message: format!("{e:#}"),
                            },
                        },
                    }
                }
                request => self.handle(request, &mut recv, peer).await,
            },
            Err(message) => Response::Error { message },
        };
        if let Response::Error { message } = &response {
            tracing::info!(%peer, "control request refused: {message}");
        }
        write_frame(&mut send, &response).await?;
        let _ = send.finish();
        Ok(())
    }

    fn authorize(&self, role: Role, request: &Request) -> std::result::Result<(), String> {
        let operator_only = matches!(
            request,
            Request::Offer { .. }
                | Request::PutBlob { .. }
                | Request::Commit { .. }
                | Request::Activate { .. }
                | Request::Rollback { .. }
                | Request::Remove { .. }
                | Request::Invoke { .. }
        );
        if operator_only && role != Role::Operator {
            return Err(format!(
                "{role} certificates may only sync; this needs an operator certificate"
            ));
        }
        Ok(())
    }

    async fn handle(&self, request: Request, recv: &mut quinn::RecvStream, peer: &str) -> Response {
        let result = match request {
            Request::Offer { manifest } => self.offer(manifest),
            Request::PutBlob {
                manifest_id,
                hash,
                offset,
            } => self.put_blob(&manifest_id, &hash, offset, recv).await,
            Request::Commit {
                manifest_id,
                activate,
            } => self.commit(&manifest_id, activate, peer).await,
            Request::List {} => self.list(),
            Request::Holdings {} => self.holdings(),
            Request::GetManifest { name, version } => self.signed_manifest(&name, version),
            Request::FetchBlob { .. } => Err(anyhow!("blob fetches are answered on their stream")),
            Request::Announce {} => {
                if let Some(syncer) = self.syncer() {
                    syncer.wake();
                }
                Ok(Response::Done {
                    message: "noted".into(),
                })
            }
            Request::Status {} => self.status(),
            Request::Activate { name, version } => self.activate(&name, version).await,
            Request::Rollback { name } => self.rollback(&name).await,
            Request::Remove { name, version } => self.remove(&name, version),
            Request::Invoke {
                name,
                method,
                path,
                body,
            } => self.node.invoke_by_name(&name, &method, &path, body).await,
        };
        result.unwrap_or_else(|e| Response::Error {
            message: format!("{e:#}"),
        })
    }

    /// The checks every manifest passes before anything it names is stored, whether it comes
    /// from an operator's push or from a peer: trusted signature, valid name, and a version newer
    /// than any seen for the name (or exactly the one stored).
    pub fn check_manifest(&self, signed: &SignedManifest) -> Result<()> {
        signed.verify(&self.trusted)?;
        let manifest = &signed.manifest;
        let id = manifest.id();
        edged_snapshots::manifest::validate_name(&manifest.name).map_err(anyhow::Error::msg)?;
        let store = self.node.store();
        let already = store.manifest(&manifest.name, manifest.version)?;
        match already {
            Some(stored) if &stored == manifest => {}
            Some(_) => bail!("{id} is already stored with different content"),
            None => {
                let newest = store.newest_version_seen(&manifest.name)?;
                if manifest.version <= newest {
                    bail!(
                        "{id} is not newer than version {newest} already seen for `{}`: refused \
                         (an older signed manifest replayed would roll the function back; use \
                         `edgectl activate` to go back to a version the node holds)",
                        manifest.name
                    );
                }
            }
        }
        Ok(())
    }

    /// The blobs of `manifest` this node stores and does not have yet: its source, and the
    /// artifact for this node's target and engine fingerprint (never another target's).
    pub fn needed_blobs(&self, manifest: &Manifest) -> BTreeMap<String, (BlobRef, BlobKind)> {
        let store = self.node.store();
        let target = self.node.target();
        let fingerprint = self.node.fingerprint().to_string();
        let mut needed = BTreeMap::new();
        needed.insert(
            manifest.source.blake3.clone(),
            (manifest.source.clone(), BlobKind::Source),
        );
        for a in &manifest.artifacts {
            if a.target == target && a.fingerprint == fingerprint {
                needed.insert(
                    a.blake3.clone(),
                    (
                        BlobRef {
                            blake3: a.blake3.clone(),
                            size: a.size,
                        },
                        BlobKind::Artifact {
                            target: a.target,
                            fingerprint: a.fingerprint.clone(),
                        },
                    ),
                );
            }
        }
        needed.retain(|hash, _| !matches!(store.blob_meta(hash), Ok(Some(_))));
        needed
    }

    fn offer(&self, signed: SignedManifest) -> Result<Response> {
        self.check_manifest(&signed)?;
        let id = signed.manifest.id();
        let needed = self.needed_blobs(&signed.manifest);
        let blobs = needed
            .values()
            .map(|(blob, _)| NeededBlob {
                blob: blob.clone(),
                have: std::fs::metadata(self.partial_path(&blob.blake3))
                    .map(|m| m.len())
                    .unwrap_or(0)
                    .min(blob.size),
            })
            .collect();
        tracing::info!(deployment = %id, signer = %signed.signer, "offer accepted");
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                id,
                Pending {
                    signed,
                    offered_at: std::time::Instant::now(),
                    needed,
                },
            );
        Ok(Response::Needed { blobs })
    }

    /// Forgets offers older than `max_age` that were never committed (the client gave up);
    /// their partial uploads expire with the store's tmp files. Returns how many were dropped.
    pub fn expire_offers(&self, max_age: std::time::Duration) -> usize {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let before = pending.len();
        pending.retain(|_, offer| offer.offered_at.elapsed() < max_age);
        before - pending.len()
    }

    fn partial_path(&self, hash: &str) -> PathBuf {
        self.node
            .store()
            .root()
            .join("tmp")
            .join(format!("upload-{hash}"))
    }

    async fn put_blob(
        &self,
        manifest_id: &str,
        hash: &str,
        offset: u64,
        recv: &mut quinn::RecvStream,
    ) -> Result<Response> {
        let (blob, kind) = {
            let pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            let offer = pending
                .get(manifest_id)
                .ok_or_else(|| anyhow!("no accepted offer for {manifest_id}; offer it first"))?;
            offer
                .needed
                .get(hash)
                .cloned()
                .ok_or_else(|| anyhow!("blob {hash} is not one {manifest_id} needs; refused"))?
        };
        let writer = {
            let mut uploads = self.uploads.lock().unwrap_or_else(|p| p.into_inner());
            let lock = match uploads.get(hash) {
                Some(current) => {
                    current.cancel.cancel();
                    current.lock.clone()
                }
                None => Arc::default(),
            };
            let writer = UploadWriter {
                lock,
                cancel: CancellationToken::new(),
                generation: UPLOAD_GENERATION.fetch_add(1, Ordering::Relaxed),
            };
            uploads.insert(hash.to_string(), writer.clone());
            writer
        };
        let cancelled = writer.cancel.clone();
        let turn = UploadTurn {
            uploads: self.uploads.clone(),
            hash: hash.to_string(),
            generation: writer.generation,
            _lock: writer.lock.clone().lock_owned().await,
        };
        if self.node.store().blob_meta(hash)?.is_some() {
            // A previous stream finished it while this one waited.
            return Ok(Response::Stored {
                hash: hash.to_string(),
            });
        }
        let partial = self.partial_path(hash);
        let have = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
        if offset > have.min(blob.size) {
            bail!("resume offset {offset} for blob {hash} is past the {have} bytes this node has");
        }
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
                    bail!("upload of blob {hash} superseded by a newer stream for it")
                }
            }
            .ok_or_else(|| anyhow!("stream ended with {remaining} bytes of blob {hash} missing"))?;
            file.write_all(&chunk.bytes)?;
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
        let store = self.node.store().clone();
        let expected = hash.to_string();
        tokio::task::spawn_blocking(move || {
            let _turn = turn;
            file.sync_all().map_err(|source| StoreError::Io {
                action: "fsync",
                path: partial.clone(),
                source,
            })?;
            drop(file);
            store.adopt_blob_file(&partial, kind, &expected)
        })
        .await?
        .map_err(|e| match e {
            StoreError::HashMismatch { expected, actual } => anyhow!(
                "blob bytes hash to {actual}, not to {expected} as the manifest says: \
                     refused, nothing stored"
            ),
            other => other.into(),
        })?;
        Ok(Response::Stored {
            hash: hash.to_string(),
        })
    }

    async fn commit(&self, manifest_id: &str, activate: bool, peer: &str) -> Result<Response> {
        let (signed, needed) = {
            let pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            let offer = pending
                .get(manifest_id)
                .ok_or_else(|| anyhow!("no accepted offer for {manifest_id}"))?;
            (
                offer.signed.clone(),
                offer.needed.keys().cloned().collect::<Vec<_>>(),
            )
        };
        let store = self.node.store();
        let missing: Vec<String> = needed
            .into_iter()
            .filter(|h| !matches!(store.blob_meta(h), Ok(Some(_))))
            .collect();
        if !missing.is_empty() {
            bail!("{manifest_id} is missing blobs: {}", missing.join(", "));
        }
        let manifest = &signed.manifest;
        self.store_deployment(&signed)?;
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(manifest_id);
        self.pushed_here
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(manifest_id.to_string());
        tracing::info!(deployment = %manifest_id, %peer, "deployment stored");
        if activate {
            self.node.activate(&manifest.name, manifest.version).await?;
        }
        if let Some(syncer) = self.syncer() {
            syncer.announce();
        }
        Ok(Response::Committed {
            id: manifest_id.to_string(),
            active: activate,
        })
    }

    /// Indexes a checked deployment whose blobs are all stored: the manifest, then the signed
    /// form peers are given.
    pub fn store_deployment(&self, signed: &SignedManifest) -> Result<()> {
        let store = self.node.store();
        let manifest = &signed.manifest;
        store.put_manifest(manifest)?;
        store.put_signature(
            &manifest.name,
            manifest.version,
            &serde_json::to_vec(signed)?,
        )?;
        Ok(())
    }

    /// Marks a deployment as being fetched by sync (peers may take the blobs already here), or
    /// no longer.
    pub fn set_syncing(&self, signed: &SignedManifest, syncing: bool) {
        let mut map = self.syncing.lock().unwrap_or_else(|p| p.into_inner());
        if syncing {
            map.insert(signed.manifest.id(), signed.clone());
        } else {
            map.remove(&signed.manifest.id());
        }
    }

    fn list(&self) -> Result<Response> {
        let store = self.node.store();
        let mut items = Vec::new();
        for m in store.manifests()? {
            let signer = store
                .signature(&m.name, m.version)?
                .and_then(|s| serde_json::from_slice::<SignedManifest>(&s).ok())
                .map(|s| s.signer);
            items.push(DeploymentInfo {
                active: store.active_version(&m.name)? == Some(m.version),
                kind: m.kind.to_string(),
                route: self.node.route_of(&m),
                init_func: m.init_func.clone(),
                signer,
                created_at: m.created_at,
                name: m.name,
                version: m.version,
            });
        }
        Ok(Response::Deployments { items })
    }

    /// The signed deployments held here (config-declared functions are node-local and not
    /// offered to peers) and those being fetched, with the blobs this node can serve for each.
    fn holdings(&self) -> Result<Response> {
        let store = self.node.store();
        let stored_blobs = |manifest: &Manifest| {
            let mut blobs = vec![manifest.source.blake3.clone()];
            blobs.extend(manifest.artifacts.iter().map(|a| a.blake3.clone()));
            blobs.retain(|hash| matches!(store.blob_meta(hash), Ok(Some(_))));
            blobs
        };
        let downloading = self.syncer().map(|s| s.fetching()).unwrap_or_default();
        let fetching = |manifest: &Manifest| -> Vec<String> {
            std::iter::once(&manifest.source.blake3)
                .chain(manifest.artifacts.iter().map(|a| &a.blake3))
                .filter(|hash| downloading.contains(*hash))
                .cloned()
                .collect()
        };
        let pushed_here = self.pushed_here.lock().unwrap_or_else(|p| p.into_inner());
        let mut items = Vec::new();
        for manifest in store.manifests()? {
            if store.signature(&manifest.name, manifest.version)?.is_none() {
                continue;
            }
            items.push(Holding {
                active: store.active_version(&manifest.name)? == Some(manifest.version),
                complete: true,
                pushed_here: pushed_here.contains(&manifest.id()),
                blobs: stored_blobs(&manifest),
                fetching: fetching(&manifest),
                name: manifest.name,
                version: manifest.version,
            });
        }
        for signed in self
            .syncing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            let manifest = &signed.manifest;
            if items
                .iter()
                .any(|h| h.name == manifest.name && h.version == manifest.version)
            {
                continue;
            }
            items.push(Holding {
                name: manifest.name.clone(),
                version: manifest.version,
                active: false,
                complete: false,
                pushed_here: false,
                blobs: stored_blobs(manifest),
                fetching: fetching(manifest),
            });
        }
        Ok(Response::Holdings { items })
    }

    fn signed_manifest(&self, name: &str, version: u64) -> Result<Response> {
        let id = format!("{name}@{version}");
        if let Some(signed) = self
            .syncing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
        {
            return Ok(Response::Manifest {
                signed: signed.clone(),
            });
        }
        let bytes = self
            .node
            .store()
            .signature(name, version)?
            .ok_or_else(|| anyhow!("{id} is not a signed deployment held here"))?;
        let signed: SignedManifest = serde_json::from_slice(&bytes)
            .with_context(|| format!("stored signature of {name}@{version} is unreadable"))?;
        Ok(Response::Manifest { signed })
    }

    /// Streams a held blob from `start` as a Bao slice. The blob is hashed while its tree is
    /// built, so a copy damaged on this node's disk is refused rather than served.
    async fn fetch_blob(
        &self,
        hash: &str,
        start: u64,
        send: &mut quinn::SendStream,
        slot: UploadSlot,
    ) -> Result<()> {
        let store = self.node.store().clone();
        let (map, meta) = store
            .map_blob(hash)
            .map_err(|e| anyhow!("blob {hash} is not held here: {e}"))?;
        if start > meta.size {
            bail!(
                "start {start} is past the {} bytes of blob {hash}",
                meta.size
            );
        }
        let (chunks_tx, mut chunks) = tokio::sync::mpsc::channel::<std::io::Result<Vec<u8>>>(4);
        let (ready_tx, ready) = tokio::sync::oneshot::channel();
        let expected = hash.to_string();
        // Building the tree reads the whole blob: off the async threads, streamed in pieces.
        tokio::task::spawn_blocking(move || {
            let mut source = match SliceSource::checked(map, &expected, start) {
                Ok(source) => {
                    let _ = ready_tx.send(Ok(()));
                    source
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            // The extractor hands out about one 1 KiB chunk per read: gather 256 KiB pieces so
            // the stream is written in large writes, not one per chunk.
            loop {
                let mut buf = vec![0u8; 256 << 10];
                let mut filled = 0;
                while filled < buf.len() {
                    match std::io::Read::read(&mut source, &mut buf[filled..]) {
                        Ok(0) => break,
                        Ok(n) => filled += n,
                        Err(e) => {
                            let _ = chunks_tx.blocking_send(Err(e));
                            return;
                        }
                    }
                }
                if filled == 0 {
                    return;
                }
                buf.truncate(filled);
                if chunks_tx.blocking_send(Ok(buf)).is_err() {
                    return; // the fetcher went away
                }
            }
        });
        if let Err(e) = ready.await? {
            tracing::error!(blob = %hash, error = %e, "stored blob is damaged; not serving it");
            bail!("this node's copy of blob {hash} is damaged; fetch it elsewhere");
        }
        write_frame(send, &Response::BlobSlice { size: meta.size }).await?;
        let served = &self.node.metrics.sync_served_bytes;
        while let Some(chunk) = chunks.recv().await {
            let chunk = chunk?;
            tokio::select! {
                written = tokio::time::timeout(UPLOAD_STALL, send.write_all(&chunk)) => {
                    written.map_err(|_| {
                        anyhow!("peer stopped reading blob {hash}; upload abandoned")
                    })??
                }
                () = slot.cancel.cancelled() => {
                    bail!("upload of blob {hash} superseded by a newer request from the same peer")
                }
            }
            served.inc_by(chunk.len() as u64);
        }
        send.finish()?;
        self.node.metrics.sync_uploads.inc();
        Ok(())
    }

    fn status(&self) -> Result<Response> {
        let store = self.node.store();
        let blobs = store.blobs()?;
        Ok(Response::Status {
            status: NodeStatus {
                node: self.node_name.clone(),
                version: env!("CARGO_PKG_VERSION").into(),
                target: self.node.target().to_string(),
                fingerprint: self.node.fingerprint().to_string(),
                functions_serving: self.node.functions().len(),
                store_bytes: blobs.iter().map(|(_, m)| m.size).sum(),
                blobs: blobs.len(),
                sync: self.syncer().map(|s| s.status()),
            },
        })
    }

    async fn activate(&self, name: &str, version: u64) -> Result<Response> {
        self.node.activate(name, version).await?;
        Ok(Response::Done {
            message: format!("{name}@{version} is active"),
        })
    }

    async fn rollback(&self, name: &str) -> Result<Response> {
        let store = self.node.store();
        let current = store
            .active_version(name)?
            .ok_or_else(|| anyhow!("`{name}` has no active version"))?;
        let previous = store
            .manifests()?
            .into_iter()
            .filter(|m| m.name == name && m.version < current)
            .map(|m| m.version)
            .max()
            .ok_or_else(|| anyhow!("`{name}` has no version older than {current} on this node"))?;
        self.node.activate(name, previous).await?;
        Ok(Response::Done {
            message: format!("{name} rolled back from {current} to {previous}"),
        })
    }

    fn remove(&self, name: &str, version: u64) -> Result<Response> {
        self.node.store().remove_manifest(name, version)?;
        Ok(Response::Done {
            message: format!("{name}@{version} removed (its blobs go at the next gc)"),
        })
    }
}
