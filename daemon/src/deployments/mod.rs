//! The deployments shell: what this node holds of the fleet's signed deployments, and the only
//! place that changes it.
//!
//! It runs admission of a signed manifest ([`Deployments::admit`], the same rules for an
//! operator's push and for a manifest a peer relays, with a typed [`Refusal`] so callers can
//! branch on the reason) and of fleet records, works out which blobs this node needs, commits,
//! activates, rolls back and removes, and answers with the holdings peers are told about. The
//! rules themselves are in [`rules`], fed plain data: this file gathers that data from the store
//! and serving and acts on the decision. It knows nothing of QUIC or HTTP: the control server
//! and sync call it, and it tells them what changed through [`DeploymentEvent`]s.

pub mod rules;

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, anyhow};
use edged_artifacts::manifest::BlobRef;
use edged_artifacts::{BlobKind, Manifest, Store, StoreError};
use edged_control::TrustedKeys;
use edged_control::signing::{SignedActivation, SignedManifest};
use edged_control::wire::{ChainPartInfo, DeploymentInfo, FleetRecordInfo, Holding};
use tokio::sync::broadcast;

use crate::events::{DeploymentEvent, DeploymentSource};
use crate::lock::lock;
use crate::serving::Serving;
pub use rules::{Applied, RecordRefusal, Refusal};
use rules::{HeldRoute, NameState, RecordDecision, RecordEffect};

/// The blobs of a deployment this node still needs, by hash.
pub type NeededBlobs = BTreeMap<String, (BlobRef, BlobKind)>;

pub struct Deployments {
    serving: Arc<Serving>,
    trusted: TrustedKeys,
    /// Deployments an operator pushed to this node (since it started): peers are steered to
    /// other holders, so this node uploads each blob about once.
    pushed_here: Mutex<HashSet<String>>,
    /// Deployments being fetched from peers, by id: their admitted manifests. Peers may already
    /// fetch the blobs that arrived.
    syncing: Mutex<BTreeMap<String, SignedManifest>>,
    /// Blobs being fetched from peers right now.
    fetching: Mutex<HashSet<String>>,
    events: broadcast::Sender<DeploymentEvent>,
}

impl Deployments {
    pub fn new(serving: Arc<Serving>, trusted: TrustedKeys) -> Arc<Deployments> {
        if trusted.is_empty() {
            tracing::warn!("no trusted operator keys: every push will be refused");
        }
        Arc::new(Deployments {
            serving,
            trusted,
            pushed_here: Mutex::default(),
            syncing: Mutex::default(),
            fetching: Mutex::default(),
            events: broadcast::channel(64).0,
        })
    }

    pub fn store(&self) -> &Arc<Store> {
        self.serving.store()
    }

    pub fn serving(&self) -> &Arc<Serving> {
        &self.serving
    }

    /// News of commits, for sync to pass on to peers.
    pub fn subscribe(&self) -> broadcast::Receiver<DeploymentEvent> {
        self.events.subscribe()
    }

    /// The checks every manifest passes before anything it names is stored, whether it comes
    /// from an operator's push or from a peer ([`rules::admit`]), fed what the store holds of
    /// the name and the routes the node's functions serve.
    pub fn admit(&self, signed: &SignedManifest) -> Result<(), Refusal> {
        let manifest = &signed.payload;
        let store = self.store();
        // Read only for a valid name (the store keys its entries by it); the rule refuses
        // another anyway.
        let (stored, newest_seen) =
            if edged_artifacts::manifest::validate_name(&manifest.name).is_ok() {
                match store.manifest(&manifest.name, manifest.version)? {
                    Some(stored) => (Some(stored), 0),
                    None => (None, store.newest_version_seen(&manifest.name)?),
                }
            } else {
                (None, 0)
            };
        let state = NameState {
            newest_seen,
            stored: stored.as_ref(),
        };
        rules::admit(signed, &self.trusted, &self.held_routes(), state)?;
        Ok(())
    }

    /// The routes this node's functions serve (config-declared and pushed, not those of a
    /// host's own table), by function name, for the route rule.
    fn held_routes(&self) -> Vec<HeldRoute> {
        let config = self.serving.config();
        let declared = config
            .functions
            .iter()
            .filter(|f| f.host.is_none())
            .map(|f| HeldRoute {
                name: f.name.clone(),
                route: f.route.clone(),
            });
        let served = self
            .serving
            .functions()
            .iter()
            .filter(|f| f.config.host.is_none())
            .map(|f| HeldRoute {
                name: f.config.name.clone(),
                route: f.config.route.clone(),
            })
            .collect::<Vec<_>>();
        declared.chain(served).collect()
    }

    /// The blobs of `manifest` this node stores and does not have yet (or holds damaged): its
    /// source (and a chain's parts), the artifact for this node's target and engine fingerprint, and the artifacts of
    /// the other targets the node keeps (`keep_targets`), which it relays to peers. A blob
    /// held here is re-hashed: a damaged copy is quarantined and asked for again, so a re-push
    /// (or a peer) repairs it.
    pub fn needed_blobs(&self, manifest: &Manifest) -> NeededBlobs {
        let store = self.store();
        let target = self.serving.target();
        let fingerprint = self.serving.fingerprint();
        let mut needed = BTreeMap::new();
        needed.insert(
            manifest.source.blake3.clone(),
            (manifest.source.clone(), BlobKind::Source),
        );
        // A chain's parts are sources too: stored (once, whatever the apps they front) so the
        // deployment is complete here and a peer can fetch it whole.
        for part in manifest.part_refs() {
            let blob = BlobRef {
                blake3: part.blake3.clone(),
                size: part.size,
            };
            needed.insert(part.blake3.clone(), (blob, BlobKind::Source));
        }
        let keep = self.serving.config().keep_targets.clone();
        // This node's own target only in the engine configuration it runs (another fingerprint
        // is useless here and recompiled from the source); other kept targets whatever their
        // fingerprint, to relay to the peers that run them.
        let wanted = manifest.artifacts.iter().filter(|a| {
            if a.target == target {
                a.fingerprint == fingerprint
            } else {
                keep.contains(&a.target)
            }
        });
        for a in wanted {
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
        needed.retain(|hash, _| !holds_intact(store, &manifest.id(), hash));
        needed
    }

    /// Whether blob `hash` is in this node's store.
    pub fn holds_blob(&self, hash: &str) -> bool {
        matches!(self.store().blob_meta(hash), Ok(Some(_)))
    }

    /// Indexes an admitted deployment whose blobs are stored (the manifest, then the signed form
    /// peers are given), activates it if asked, and only then tells sync about it: a peer that
    /// hears of it sees it active where it is meant to be.
    pub async fn commit(
        &self,
        signed: &SignedManifest,
        source: DeploymentSource,
        activate: bool,
    ) -> Result<()> {
        let store = self.store();
        let manifest = &signed.payload;
        let id = manifest.id();
        if source != DeploymentSource::Sync {
            self.check_arrival_activation(manifest, activate)?;
        }
        store.put_manifest(manifest)?;
        store.put_signature(
            &manifest.name,
            manifest.version,
            &serde_json::to_vec(signed)?,
        )?;
        if source == DeploymentSource::Push {
            lock(&self.pushed_here).insert(id.clone());
        }
        tracing::info!(deployment = %id, ?source, "deployment stored");
        // A synced version that the name's fleet record names is activated on arrival (the
        // record was applied before the version got here).
        let record_version = match source {
            DeploymentSource::Sync => self
                .fleet_record(&manifest.name)?
                .map(|r| r.payload.version),
            _ => None,
        };
        let activate = rules::activate_on_arrival(
            activate,
            source == DeploymentSource::Sync,
            manifest.version,
            record_version,
        );
        if activate {
            self.activate(&manifest.name, manifest.version).await?;
        }
        // Nobody listening (no sync) is fine.
        let _ = self.events.send(DeploymentEvent::Committed { id, source });
        Ok(())
    }

    /// Refuses an operator's push or deploy that would activate a version older than the active
    /// one ([`rules::check_arrival_activation`]); checked before anything is pulled and again at
    /// commit.
    pub fn check_arrival_activation(&self, manifest: &Manifest, activate: bool) -> Result<()> {
        let active = self.store().active_version(&manifest.name)?;
        rules::check_arrival_activation(&manifest.name, manifest.version, activate, active)?;
        Ok(())
    }

    /// Makes `name@version` the active version and starts serving it, once the node has proven
    /// it can serve it: a version that cannot be served never replaces one that can.
    pub async fn activate(&self, name: &str, version: u64) -> Result<()> {
        let manifest = self
            .store()
            .manifest(name, version)?
            .ok_or_else(|| anyhow!("{name}@{version} is not stored on this node"))?;
        self.serving.prove(&manifest).await?;
        self.store().activate(name, version)?;
        self.serving.rebuild().await?;
        tracing::info!(deployment = %format!("{name}@{version}"), "activated");
        Ok(())
    }

    /// Activates the newest version older than the active one. Returns `(from, to)`.
    pub async fn rollback(&self, name: &str) -> Result<(u64, u64)> {
        let store = self.store();
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
        self.activate(name, previous).await?;
        Ok((current, previous))
    }

    /// Forgets `name@version` (refused while it is active); its blobs go at the next gc.
    pub fn remove(&self, name: &str, version: u64) -> Result<()> {
        self.store().remove_manifest(name, version)?;
        Ok(())
    }

    /// The fleet activation record `name` follows here, if any.
    pub fn fleet_record(&self, name: &str) -> Result<Option<SignedActivation>, StoreError> {
        let Some(bytes) = self.store().activation(name)? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| StoreError::IndexEntry {
                key: format!("activations/{name}"),
                reason: format!("stored fleet record is unreadable: {e}"),
            })
    }

    /// The sequence and version of the fleet record `name` follows, for `ls` and `status`.
    pub fn fleet_record_info(&self, name: &str) -> Result<Option<FleetRecordInfo>, StoreError> {
        Ok(self.fleet_record(name)?.map(|r| FleetRecordInfo {
            sequence: r.payload.sequence,
            version: r.payload.version,
            epoch: r.payload.epoch,
        }))
    }

    /// Every fleet activation record applied here, for peers.
    pub fn fleet_records(&self) -> Result<Vec<SignedActivation>> {
        self.store()
            .activations()?
            .iter()
            .map(|bytes| Ok(serde_json::from_slice(bytes)?))
            .collect()
    }

    /// Applies a fleet activation record from an operator or a peer: checked like a manifest
    /// (trusted signer, valid name) and applied only if newer than the last record for its
    /// name. It is stored first, so it spreads (and is applied when its version arrives) even
    /// where the version cannot be activated now.
    pub async fn apply_activation(
        &self,
        signed: &SignedActivation,
    ) -> std::result::Result<Applied, RecordRefusal> {
        let record = &signed.payload;
        let id = record.id();
        let current = match edged_artifacts::manifest::validate_name(&record.name) {
            Ok(()) => self.fleet_record(&record.name)?,
            Err(_) => None,
        };
        if rules::check_record(signed, &self.trusted, current.as_ref())?
            == RecordDecision::AlreadyApplied
        {
            return Ok(Applied::AlreadyApplied);
        }
        let bytes = serde_json::to_vec(signed).expect("records serialize");
        self.store().put_activation(&record.name, &bytes)?;
        let _ = self
            .events
            .send(DeploymentEvent::FleetRecordApplied { id: id.clone() });
        let store = self.store();
        let held = store.manifest(&record.name, record.version)?.is_some();
        match rules::record_effect(record.version, held, store.active_version(&record.name)?) {
            RecordEffect::Pending => {
                tracing::info!(record = %id, "fleet record applied; its version is not here yet");
                return Ok(Applied::Pending);
            }
            RecordEffect::AlreadyActive => {
                tracing::info!(record = %id, "fleet record applied; its version was already active");
                return Ok(Applied::Activated);
            }
            RecordEffect::Activate => {}
        }
        match self.activate(&record.name, record.version).await {
            Ok(()) => {
                tracing::info!(record = %id, "fleet record applied");
                Ok(Applied::Activated)
            }
            Err(e) => {
                let reason = format!("{e:#}");
                tracing::error!(record = %id, error = %reason, "fleet record applied, but this node cannot serve its version; keeping the active one");
                Ok(Applied::NotServable(reason))
            }
        }
    }

    /// Every deployment stored here, for `edgectl ls`.
    pub fn list(&self) -> Result<Vec<DeploymentInfo>> {
        let store = self.store();
        let mut items = Vec::new();
        for m in store.manifests()? {
            let signer = store
                .signature(&m.name, m.version)?
                .and_then(|s| serde_json::from_slice::<SignedManifest>(&s).ok())
                .map(|s| s.signer);
            items.push(DeploymentInfo {
                fleet_record: self.fleet_record_info(&m.name)?,
                active: store.active_version(&m.name)? == Some(m.version),
                kind: m.guest_kind().to_string(),
                route: self.serving.route_of(&m),
                init_func: m.init_func.clone(),
                signer,
                created_at: m.created_at,
                parts: m
                    .part_refs()
                    .iter()
                    .map(|p| ChainPartInfo {
                        name: p.name.clone(),
                        role: p.role.to_string(),
                        blake3: p.blake3.clone(),
                    })
                    .collect(),
                memory_image: m.memory_image.as_deref().cloned(),
                name: m.name,
                version: m.version,
            });
        }
        Ok(items)
    }

    /// The signed deployments held here (config-declared functions are node-local and not
    /// offered to peers) and those being fetched, with the blobs this node can serve for each.
    pub fn holdings(&self) -> Result<Vec<Holding>> {
        let store = self.store();
        let fetching = lock(&self.fetching).clone();
        let blobs_of = |manifest: &Manifest| -> (Vec<String>, Vec<String>) {
            let all = manifest.blob_hashes().map(str::to_string);
            let (stored, rest): (Vec<String>, Vec<String>) =
                all.partition(|hash| self.holds_blob(hash));
            let downloading = rest.into_iter().filter(|h| fetching.contains(h)).collect();
            (stored, downloading)
        };
        let pushed_here = lock(&self.pushed_here).clone();
        let mut items = Vec::new();
        for manifest in store.manifests()? {
            if store.signature(&manifest.name, manifest.version)?.is_none() {
                continue;
            }
            let (blobs, fetching) = blobs_of(&manifest);
            items.push(Holding {
                active: store.active_version(&manifest.name)? == Some(manifest.version),
                complete: true,
                pushed_here: pushed_here.contains(&manifest.id()),
                registry: store.published(&manifest.name, manifest.version)?,
                blobs,
                fetching,
                name: manifest.name,
                version: manifest.version,
            });
        }
        for signed in lock(&self.syncing).values() {
            let manifest = &signed.payload;
            if items
                .iter()
                .any(|h| h.name == manifest.name && h.version == manifest.version)
            {
                continue;
            }
            let (blobs, fetching) = blobs_of(manifest);
            items.push(Holding {
                name: manifest.name.clone(),
                version: manifest.version,
                active: false,
                complete: false,
                pushed_here: false,
                registry: None,
                blobs,
                fetching,
            });
        }
        Ok(items)
    }

    /// Whether `hash` is a blob of a deployment an operator pushed to this node: its blobs are
    /// this node's to seed to the fleet (each piece uploaded about once).
    pub fn pushed_here_holds(&self, hash: &str) -> bool {
        let pushed_here = lock(&self.pushed_here).clone();
        let store = self.store();
        pushed_here.iter().any(|id| {
            id.rsplit_once('@')
                .and_then(|(name, version)| Some((name, version.parse::<u64>().ok()?)))
                .and_then(|(name, version)| store.manifest(name, version).ok().flatten())
                .is_some_and(|m| m.blob_hashes().any(|h| h == hash))
        })
    }

    /// The signed manifest of `name@version`, held or being fetched.
    pub fn signed_manifest(&self, name: &str, version: u64) -> Result<SignedManifest> {
        let id = format!("{name}@{version}");
        if let Some(signed) = lock(&self.syncing).get(&id) {
            return Ok(signed.clone());
        }
        let bytes = self
            .store()
            .signature(name, version)?
            .ok_or_else(|| anyhow!("{id} is not a signed deployment held here"))?;
        serde_json::from_slice(&bytes)
            .with_context(|| format!("stored signature of {id} is unreadable"))
    }

    /// Marks an admitted deployment as being fetched from peers until the mark drops: peers are
    /// told about it (and may take the blobs already here) while it is incomplete.
    pub fn begin_sync(self: &Arc<Self>, signed: &SignedManifest) -> SyncMark {
        let id = signed.payload.id();
        lock(&self.syncing).insert(id.clone(), signed.clone());
        SyncMark {
            deployments: self.clone(),
            id,
        }
    }

    /// Marks blob `hash` as being fetched from peers until the mark drops.
    pub fn begin_fetch(self: &Arc<Self>, hash: &str) -> FetchMark {
        lock(&self.fetching).insert(hash.to_string());
        FetchMark {
            deployments: self.clone(),
            hash: hash.to_string(),
        }
    }
}

/// Whether `store` holds blob `hash` (of deployment `id`) intact. A damaged copy is taken out
/// of the store (its file kept under `damaged/`), so the fresh copy a push or a peer brings is
/// accepted; a store that cannot be read counts as not holding it.
fn holds_intact(store: &Store, id: &str, hash: &str) -> bool {
    match store.check_blob(hash) {
        Ok(_) => true,
        Err(StoreError::MissingBlob(_)) => false,
        Err(damage @ StoreError::Corrupt { .. }) => {
            let reason =
                format!("blob {hash} of {id} failed its check ({damage}); asking for it again");
            if let Err(e) = store.quarantine_blob(hash, &reason) {
                tracing::error!(blob = %hash, error = %e, "cannot take damaged blob out of the store");
            }
            false
        }
        Err(e) => {
            tracing::warn!(blob = %hash, error = %e, "cannot read the store's index entry");
            false
        }
    }
}

/// A deployment being fetched from peers; see [`Deployments::begin_sync`].
pub struct SyncMark {
    deployments: Arc<Deployments>,
    id: String,
}

impl Drop for SyncMark {
    fn drop(&mut self) {
        lock(&self.deployments.syncing).remove(&self.id);
    }
}

/// A blob being fetched from peers; see [`Deployments::begin_fetch`].
pub struct FetchMark {
    deployments: Arc<Deployments>,
    hash: String,
}

impl Drop for FetchMark {
    fn drop(&mut self) {
        lock(&self.deployments.fetching).remove(&self.hash);
    }
}
