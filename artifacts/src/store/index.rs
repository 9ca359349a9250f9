//! The index's records of deployments: manifests, the signatures they arrived with, where they
//! are published, fleet activation records, active versions and this node's compile records,
//! and how their keys are encoded.

use serde::Deserialize;

use super::blobs::BlobKind;
use super::{Store, StoreError};
use crate::manifest::{Manifest, validate_name};

pub(super) fn manifest_key(name: &str, version: u64) -> Vec<u8> {
    let mut key = name.as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(&version.to_be_bytes());
    key
}

pub(super) fn decode_version(bytes: &[u8]) -> u64 {
    u64::from_be_bytes(bytes.try_into().unwrap_or_default())
}

fn compiled_key(source: &str, init: Option<&str>, fingerprint: &str) -> Vec<u8> {
    format!("{source}\0{}\0{fingerprint}", init.unwrap_or("")).into_bytes()
}

pub(super) fn decode<T: for<'de> Deserialize<'de>>(
    key: &[u8],
    value: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(value).map_err(|e| StoreError::IndexEntry {
        key: String::from_utf8_lossy(key).replace('\0', "/"),
        reason: e.to_string(),
    })
}

impl Store {
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
}
