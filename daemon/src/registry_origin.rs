//! The OCI registry origin (`[registry]`): a node pulls a published deployment's blobs from a
//! registry itself — when an operator deploys one by reference (`edgectl deploy oci://…`, the
//! control server calls [`RegistryOrigin::deploy`]), and when sync finds no peer holding a blob
//! of a deployment that is published there ([`RegistryOrigin::fetch_blob`]).
//!
//! The registry is untrusted storage. The signed manifest is admitted exactly like a push
//! (trusted signer, newer version); the registry only maps its BLAKE3 names to OCI layers. Each
//! blob is downloaded into the store's resumable partial file `tmp/registry-<blake3>` (an
//! interrupted download continues with an HTTP Range request) and enters the store only through
//! [`edged_artifacts::Store::adopt_blob_file`]: fsync, re-hash against its BLAKE3 name, rename.
//! A blob that fails is refused with its name and its partial file removed; nothing of it is
//! stored. Downloads run beside serving and never block it; a registry that is down or stalls
//! is retried with backoff ([`Retry`], a sans-IO core) within [`RETRY_WINDOW`], and a later
//! deploy (or sync round) resumes from the partial file.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use edged_artifacts::manifest::BlobRef;
use edged_artifacts::{BlobKind, Partial, StoreError};
use edged_control::pacing::Pacer;
use edged_control::registry::{
    Access, Credentials, DeploymentLayers, RegistryClient, RegistryError, display_reference,
    parse_reference,
};
use edged_control::signing::SignedManifest;
use edged_node_config::RegistryConfig;
use futures_util::StreamExt;
use oci_client::Reference;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::io::AsyncWriteExt;

use crate::deployments::Deployments;
use crate::events::DeploymentSource;
use crate::metrics::OutcomeLabel;

/// How long one deploy (or one sync fetch) keeps retrying a registry that is down or stalls.
/// The partial download is kept after that: the next attempt resumes it.
pub const RETRY_WINDOW: Duration = Duration::from_secs(120);
/// A registry that sends nothing for this long is treated as down for this attempt.
const STALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Retry timing for a registry that is unavailable, sans-IO: 250 ms doubling to 8 s between
/// attempts, no new attempt once [`RETRY_WINDOW`] (or the given window) has passed.
#[derive(Debug, Clone)]
pub struct Retry {
    started: Instant,
    window: Duration,
    failures: u32,
}

impl Retry {
    pub fn new(now: Instant, window: Duration) -> Retry {
        Retry {
            started: now,
            window,
            failures: 0,
        }
    }

    /// After a failed attempt: how long to wait before the next, or `None` to give up.
    pub fn failed(&mut self, now: Instant) -> Option<Duration> {
        let wait = Duration::from_millis(250)
            .saturating_mul(1 << self.failures.min(5))
            .min(Duration::from_secs(8));
        self.failures += 1;
        let deadline = self.started + self.window;
        (now + wait <= deadline).then_some(wait)
    }

    /// Progress was made (bytes arrived): the next failure starts the backoff afresh.
    pub fn progressed(&mut self, now: Instant) {
        self.failures = 0;
        self.started = now;
    }
}

/// Why pulling one blob from the registry failed.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// The registry served bytes that are not the blob the signed manifest names. Retrying
    /// the same registry will not help.
    #[error("blob {hash} of {id} from {reference} refused: {reason}; nothing was stored")]
    BadData {
        hash: String,
        id: String,
        reference: String,
        reason: String,
    },
    /// The registry is down, stalled or refused, after retrying within the window.
    #[error(
        "blob {hash} of {id}: registry unavailable ({reason}); {have} of {size} bytes are kept and the next attempt resumes"
    )]
    Unavailable {
        hash: String,
        id: String,
        reason: String,
        have: u64,
        size: u64,
    },
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

pub struct RegistryOrigin {
    deployments: Arc<Deployments>,
    config: RegistryConfig,
    client: RegistryClient,
    pacer: Pacer,
    /// One download per blob at a time.
    blob_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Deployment layer maps by pinned reference (they are immutable: pinned by digest).
    layers: tokio::sync::Mutex<HashMap<String, Arc<DeploymentLayers>>>,
    fetched_bytes: Counter,
    fetches: Family<OutcomeLabel, Counter>,
    window: Duration,
}

impl RegistryOrigin {
    /// Loads the credentials and CA the config names (errors name the file).
    pub fn new(
        deployments: Arc<Deployments>,
        config: &RegistryConfig,
        registry: &mut Registry,
    ) -> Result<Arc<RegistryOrigin>> {
        let credentials = config
            .credentials_file
            .as_deref()
            .map(Credentials::load)
            .transpose()
            .context("[registry] credentials_file")?;
        let access = Access {
            plain_http: config.plain_http,
            ca_file: config.ca_file.clone(),
            credentials,
            read_timeout: Some(STALL_TIMEOUT),
        };
        let client = RegistryClient::new(&access).context("[registry]")?;
        let fetched_bytes = Counter::default();
        let fetches = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "registry_fetched_bytes",
            "Blob bytes downloaded from the OCI registry",
            fetched_bytes.clone(),
        );
        registry.register(
            "registry_fetches",
            "Blob downloads from the OCI registry, by outcome (ok, bad_data, unavailable)",
            fetches.clone(),
        );
        Ok(Arc::new(RegistryOrigin {
            deployments,
            pacer: Pacer::new(config.max_rate_bytes),
            config: config.clone(),
            client,
            blob_locks: Mutex::default(),
            layers: tokio::sync::Mutex::default(),
            fetched_bytes,
            fetches,
            window: RETRY_WINDOW,
        }))
    }

    /// The registry this node pulls from, as `status` shows it: scheme and host, and whether
    /// it logs in — never the login itself.
    pub fn describe(&self) -> String {
        let scheme = if self.config.plain_http {
            "http"
        } else {
            "https"
        };
        let login = if self.config.credentials_file.is_some() {
            " (with credentials)"
        } else {
            ""
        };
        format!("{scheme}://{}{login}", self.config.host)
    }

    /// `text` as a deployment pinned by digest on this node's registry.
    pub fn pinned(&self, text: &str) -> Result<Reference> {
        let reference = parse_reference(text)?;
        if reference.registry() != self.config.host {
            bail!(
                "{text} is on registry {}, but this node's [registry] is {}; it pulls from no \
                 other",
                reference.registry(),
                self.config.host
            );
        }
        if reference.digest().is_none() {
            bail!(
                "{text} names a tag; nodes are given deployments pinned by digest (edgectl deploy resolves the tag)"
            );
        }
        Ok(reference)
    }

    /// The deployment referrer at `pinned`, read once and kept.
    async fn layers(&self, pinned: &Reference) -> Result<Arc<DeploymentLayers>> {
        let key = pinned.whole();
        if let Some(layers) = self.layers.lock().await.get(&key) {
            return Ok(layers.clone());
        }
        let mut retry = Retry::new(Instant::now(), self.window);
        let layers = loop {
            match self.client.deployment_layers(pinned).await {
                Ok(layers) => break layers,
                Err(e) if e.is_unavailable() => match retry.failed(Instant::now()) {
                    Some(wait) => {
                        tracing::info!(reference = %display_reference(pinned), error = %e, ?wait, "registry unavailable; retrying");
                        tokio::time::sleep(wait).await;
                    }
                    None => return Err(e.into()),
                },
                Err(e) => return Err(e.into()),
            }
        };
        let layers = Arc::new(layers);
        self.layers.lock().await.insert(key, layers.clone());
        Ok(layers)
    }

    /// An operator's deploy of a published deployment: admit the signed manifest (like a push),
    /// pull the blobs this node needs from the registry, commit, and activate if asked.
    pub async fn deploy(
        &self,
        signed: &SignedManifest,
        reference: &str,
        activate: bool,
    ) -> Result<()> {
        let id = signed.payload.id();
        let pinned = self.pinned(reference)?;
        self.deployments
            .admit(signed)
            .with_context(|| format!("deployment {id} refused"))?;
        self.deployments
            .check_arrival_activation(&signed.payload, activate)
            .with_context(|| format!("deployment {id} refused"))?;
        let layers = self.layers(&pinned).await?;
        if layers.signed.payload != signed.payload {
            bail!(
                "{reference} holds {}, not the {id} this deploy names",
                layers.signed.payload.id()
            );
        }
        // Peers see it (and may take the blobs already here) while it downloads.
        let _pulling = self.deployments.begin_sync(signed);
        let needed = self.deployments.needed_blobs(&signed.payload);
        tracing::info!(deployment = %id, reference, blobs = needed.len(), "pulling deployment from the registry");
        let pulls = needed.into_values().map(|(blob, kind)| {
            let (pinned, id) = (&pinned, &id);
            async move { self.fetch_blob(pinned, id, &blob, kind).await }
        });
        let results = futures_util::future::join_all(pulls).await;
        for result in results {
            result?;
        }
        let store = self.deployments.store();
        store.put_published(
            &signed.payload.name,
            signed.payload.version,
            &display_reference(&pinned),
        )?;
        self.deployments
            .commit(signed, DeploymentSource::Registry, activate)
            .await?;
        Ok(())
    }

    fn blob_lock(&self, hash: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.blob_locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.retain(|_, lock| Arc::strong_count(lock) > 1);
        locks.entry(hash.to_string()).or_default().clone()
    }

    /// Pulls blob `blob` of deployment `id` (published at `pinned`) into the store, resuming
    /// a partial download, retrying an unavailable registry with backoff.
    pub async fn fetch_blob(
        &self,
        pinned: &Reference,
        id: &str,
        blob: &BlobRef,
        kind: BlobKind,
    ) -> Result<(), PullError> {
        let hash = &blob.blake3;
        let lock = self.blob_lock(hash);
        let _one_download_per_blob = lock.lock().await;
        if self.deployments.holds_blob(hash) {
            return Ok(());
        }
        let layers = self.layers(pinned).await?;
        let reference = display_reference(pinned);
        let bad = |reason: String| PullError::BadData {
            hash: hash.clone(),
            id: id.to_string(),
            reference: reference.clone(),
            reason,
        };
        let layer = layers.blobs.get(hash).ok_or_else(|| {
            bad("the registry's deployment has no layer with this BLAKE3 name".into())
        })?;
        if u64::try_from(layer.size).ok() != Some(blob.size) {
            self.fetches
                .get_or_create(&OutcomeLabel::new("bad_data"))
                .inc();
            return Err(bad(format!(
                "the registry says it has {} bytes; the signed manifest says {}",
                layer.size, blob.size
            )));
        }
        let store = self.deployments.store().clone();
        let partial = store.partial_path(Partial::RegistryFetch(hash));
        let _fetching = self.deployments.begin_fetch(hash);
        let mut retry = Retry::new(Instant::now(), self.window);
        loop {
            let have = store.partial_len(Partial::RegistryFetch(hash));
            match self
                .download(pinned, layer, &partial, have, blob.size)
                .await
            {
                Ok(()) => break,
                Err(Download::TooLong) => {
                    let _ = std::fs::remove_file(&partial);
                    self.fetches
                        .get_or_create(&OutcomeLabel::new("bad_data"))
                        .inc();
                    return Err(bad(format!(
                        "it sent more than the {} bytes the signed manifest says",
                        blob.size
                    )));
                }
                Err(Download::Unavailable { reason, progressed }) => {
                    if progressed {
                        retry.progressed(Instant::now());
                    }
                    let have = store.partial_len(Partial::RegistryFetch(hash));
                    match retry.failed(Instant::now()) {
                        Some(wait) => {
                            tracing::warn!(blob = %hash, deployment = %id, registry = %self.config.host, have, size = blob.size, ?wait, "registry download interrupted ({reason}); retrying");
                            tokio::time::sleep(wait).await;
                        }
                        None => {
                            self.fetches
                                .get_or_create(&OutcomeLabel::new("unavailable"))
                                .inc();
                            return Err(PullError::Unavailable {
                                hash: hash.clone(),
                                id: id.to_string(),
                                reason,
                                have,
                                size: blob.size,
                            });
                        }
                    }
                }
                Err(Download::Io(e)) => {
                    return Err(anyhow::Error::from(e)
                        .context(format!("partial download {}", partial.display()))
                        .into());
                }
            }
        }
        // Hash and kind are checked as the file is renamed into the store; a mismatch removes it.
        let adopted = {
            let (store, partial, hash, kind) = (store.clone(), partial.clone(), hash.clone(), kind);
            tokio::task::spawn_blocking(move || store.adopt_blob_file(&partial, kind, &hash))
                .await
                .map_err(|e| anyhow!("verifier task: {e}"))?
        };
        match adopted {
            Ok(_) => {
                self.fetches.get_or_create(&OutcomeLabel::new("ok")).inc();
                tracing::info!(blob = %hash, deployment = %id, registry = %self.config.host, bytes = blob.size, "blob pulled from the registry and verified");
                Ok(())
            }
            Err(e @ (StoreError::HashMismatch { .. } | StoreError::BadBlob { .. })) => {
                self.fetches
                    .get_or_create(&OutcomeLabel::new("bad_data"))
                    .inc();
                let _ = std::fs::remove_file(&partial);
                Err(bad(format!(
                    "it fails verification against the signed manifest: {e}"
                )))
            }
            Err(e) => Err(anyhow::Error::from(e).into()),
        }
    }

    /// One attempt: append the blob from byte `have` on to the partial file.
    async fn download(
        &self,
        pinned: &Reference,
        layer: &oci_client::manifest::OciDescriptor,
        partial: &Path,
        have: u64,
        size: u64,
    ) -> Result<(), Download> {
        if have == size {
            return Ok(());
        }
        if have > size {
            return Err(Download::TooLong);
        }
        let unavailable = |e: RegistryError| Download::Unavailable {
            reason: e.to_string(),
            progressed: false,
        };
        let (start, mut stream) = self
            .client
            .blob_from(pinned, layer, have)
            .await
            .map_err(unavailable)?;
        if start > 0 {
            tracing::info!(blob = %layer.digest, start, size, "resuming a registry download");
        }
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(start == 0)
            .open(partial)
            .await
            .map_err(Download::Io)?;
        if start > 0 {
            use tokio::io::AsyncSeekExt;
            file.seek(std::io::SeekFrom::Start(start))
                .await
                .map_err(Download::Io)?;
        }
        let got = AtomicU64::new(start);
        let outcome = loop {
            let next = tokio::time::timeout(STALL_TIMEOUT, stream.next()).await;
            let chunk = match next {
                Err(_) => break Err(format!("sent nothing for {STALL_TIMEOUT:?}")),
                Ok(None) => break Ok(()),
                Ok(Some(Err(e))) => break Err(e.to_string()),
                Ok(Some(Ok(chunk))) => chunk,
            };
            let total = got.fetch_add(chunk.len() as u64, Ordering::Relaxed) + chunk.len() as u64;
            if total > size {
                return Err(Download::TooLong);
            }
            file.write_all(&chunk).await.map_err(Download::Io)?;
            self.fetched_bytes.inc_by(chunk.len() as u64);
            self.pacer.moved_async(chunk.len() as u64).await;
        };
        file.sync_all().await.map_err(Download::Io)?;
        let got = got.load(Ordering::Relaxed);
        match outcome {
            Ok(()) if got == size => Ok(()),
            // Every byte is here: the client's own digest check of a whole response may still
            // complain at the end; the BLAKE3 check on adoption decides.
            Err(_) if got == size => Ok(()),
            Ok(()) => Err(Download::Unavailable {
                reason: format!("the response ended after {got} of {size} bytes"),
                progressed: got > start,
            }),
            Err(reason) => Err(Download::Unavailable {
                reason,
                progressed: got > start,
            }),
        }
    }
}

enum Download {
    TooLong,
    Unavailable { reason: String, progressed: bool },
    Io(std::io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_and_stop_at_the_window() {
        let t0 = Instant::now();
        let mut retry = Retry::new(t0, Duration::from_secs(20));
        let waits: Vec<_> = (0..7).map(|_| retry.failed(t0).unwrap()).collect();
        assert_eq!(
            waits.iter().map(|d| d.as_millis()).collect::<Vec<_>>(),
            [250, 500, 1000, 2000, 4000, 8000, 8000]
        );
        // Past the window: give up.
        assert_eq!(retry.failed(t0 + Duration::from_secs(15)), None);
    }

    #[test]
    fn progress_restarts_the_backoff_and_the_window() {
        let t0 = Instant::now();
        let mut retry = Retry::new(t0, Duration::from_secs(10));
        for _ in 0..4 {
            retry.failed(t0);
        }
        let later = t0 + Duration::from_secs(9);
        retry.progressed(later);
        assert_eq!(retry.failed(later), Some(Duration::from_millis(250)));
        assert!(retry.failed(later + Duration::from_secs(5)).is_some());
    }
}
