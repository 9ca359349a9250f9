//! Housekeeping: which blobs manifests reference, `gc` of the rest (refused while the index
//! looks damaged), stray files, and `verify` with its cross-check of the index
//! ([`VerifyReport`], [`GcReport`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use super::blobs::check_content;
use super::index::decode_version;
use super::{Store, StoreError, io_err, is_blob_name, now_secs};

/// What `verify` found. `problems` break the store's invariant; stray files do not.
#[derive(Debug, Default, Clone, Serialize)]
pub struct VerifyReport {
    pub blobs_checked: usize,
    pub bytes_hashed: u64,
    pub manifests_checked: usize,
    pub problems: Vec<String>,
    /// Indexed blobs whose file is damaged or unreadable (each also has a line in `problems`).
    pub damaged_blobs: Vec<String>,
    /// Blob files with no index entry (left by a crash mid-put); `gc` removes them.
    pub stray_files: Vec<PathBuf>,
}

impl VerifyReport {
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct GcReport {
    pub blobs_removed: Vec<String>,
    pub bytes_freed: u64,
    pub stray_files_removed: usize,
}

impl Store {
    /// Blob hashes reachable from a manifest, with the manifests that reach each one.
    pub fn references(&self) -> Result<BTreeMap<String, BTreeSet<String>>, StoreError> {
        let mut refs: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let manifests = self.manifests()?;
        let mut source_owners: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for m in &manifests {
            for hash in m.blob_hashes() {
                refs.entry(hash.to_string()).or_default().insert(m.id());
            }
            source_owners
                .entry(m.source.blake3.as_str())
                .or_default()
                .push(m.id());
        }
        for entry in self.compiled.iter() {
            let (k, v) = entry?;
            let key = String::from_utf8_lossy(&k);
            let source = key.split('\0').next().unwrap_or_default();
            if let Some(owners) = source_owners.get(source) {
                let artifact = String::from_utf8_lossy(&v).into_owned();
                refs.entry(artifact)
                    .or_default()
                    .extend(owners.iter().cloned());
            }
        }
        Ok(refs)
    }

    /// Deletes blobs no manifest reaches, and stray files, that are older than `min_age` (so
    /// blobs of a push still in flight survive).
    ///
    /// Refuses ([`StoreError::GcRefused`], nothing deleted) while the index looks damaged: it
    /// names something it does not hold that no quarantine explains, or it holds blobs but no
    /// manifest at all. Deleting "unreferenced" blobs then would delete what a lost index entry
    /// referenced. Every file deleted is logged.
    pub fn gc(&self, min_age: Duration) -> Result<GcReport, StoreError> {
        let _guard = self.blob_lock.lock().unwrap_or_else(|p| p.into_inner());
        let suspicious = self.index_problems()?.unexplained;
        if let Some(first) = suspicious.first() {
            return Err(StoreError::GcRefused(format!(
                "the index looks damaged ({} problem{}, first: {first}); run `edged verify`",
                suspicious.len(),
                if suspicious.len() == 1 { "" } else { "s" }
            )));
        }
        if self.manifests.is_empty() && !self.blobs.is_empty() {
            return Err(StoreError::GcRefused(format!(
                "the index holds {} blobs but no manifest, as a damaged index would; run \
                 `edged verify`",
                self.blobs.len()
            )));
        }
        let refs = self.references()?;
        let cutoff = now_secs().saturating_sub(min_age.as_secs());
        let mut report = GcReport::default();

        // Compiled-artifact records whose source is gone go first, so no record outlives its blob.
        for entry in self.compiled.iter() {
            let (k, v) = entry?;
            if !refs.contains_key(String::from_utf8_lossy(&v).as_ref()) {
                self.compiled.remove(k)?;
            }
        }
        self.db.flush()?;

        for (hash, meta) in self.blobs()? {
            if refs.contains_key(&hash) || meta.stored_at > cutoff {
                continue;
            }
            // Index entry first: a crash after this leaves a stray file, never a dangling entry.
            self.blobs.remove(hash.as_bytes())?;
            self.db.flush()?;
            let path = self.blob_path(&hash);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("remove", &path)(e)),
            }
            tracing::info!(blob = %hash, size = meta.size, kind = ?meta.kind, "deleted unreferenced blob");
            report.bytes_freed += meta.size;
            report.blobs_removed.push(hash);
        }

        for path in self.stray_files()? {
            let old_enough = fs::metadata(&path)
                .and_then(|m| m.modified())
                .map(|t| t.elapsed().unwrap_or_default() >= min_age)
                .unwrap_or(true);
            let size = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            if old_enough && fs::remove_file(&path).is_ok() {
                tracing::info!(file = %path.display(), size, "deleted stray file (not indexed)");
                report.stray_files_removed += 1;
            }
        }
        Ok(report)
    }

    fn stray_files(&self) -> Result<Vec<PathBuf>, StoreError> {
        let mut stray = Vec::new();
        let blobs_dir = self.root.join("blobs");
        for fanout in fs::read_dir(&blobs_dir).map_err(io_err("list", &blobs_dir))? {
            let fanout = fanout.map_err(io_err("list", &blobs_dir))?.path();
            if !fanout.is_dir() {
                stray.push(fanout);
                continue;
            }
            for file in fs::read_dir(&fanout).map_err(io_err("list", &fanout))? {
                let path = file.map_err(io_err("list", &fanout))?.path();
                let name = path.file_name().unwrap_or_default().to_string_lossy();
                if !is_blob_name(&name) || !self.blobs.contains_key(name.as_bytes())? {
                    stray.push(path);
                }
            }
        }
        Ok(stray)
    }

    /// Re-hashes every blob and cross-checks the index. Nothing is changed (a damaged blob is
    /// reported, not quarantined: that is for whoever brings a fresh copy).
    pub fn verify(&self) -> Result<VerifyReport, StoreError> {
        let mut report = VerifyReport::default();
        for (hash, meta) in self.blobs()? {
            report.blobs_checked += 1;
            let path = self.blob_path(&hash);
            match fs::read(&path) {
                Ok(bytes) => {
                    report.bytes_hashed += bytes.len() as u64;
                    if let Err(e) = check_content(&hash, &meta, &bytes) {
                        report.problems.push(e.to_string());
                        report.damaged_blobs.push(hash);
                    }
                }
                Err(e) => {
                    report.problems.push(format!(
                        "blob {hash}: indexed but unreadable at {}: {e}",
                        path.display()
                    ));
                    report.damaged_blobs.push(hash);
                }
            }
        }
        let index = self.index_problems()?;
        report.manifests_checked = index.manifests_checked;
        report.problems.extend(index.explained);
        report.problems.extend(index.unexplained);
        report.stray_files = self.stray_files()?;
        Ok(report)
    }
}

/// What the index names but does not hold, from [`Store::index_problems`].
struct IndexProblems {
    manifests_checked: usize,
    /// Blobs a manifest names that were quarantined as damaged (their copy is in `damaged/`):
    /// known damage, repaired by a fresh copy.
    explained: Vec<String>,
    /// Anything else: a sign the index itself lost entries.
    unexplained: Vec<String>,
}

impl Store {
    /// Cross-checks the index without reading blob files: every manifest's source is indexed,
    /// every active version is stored, every compile record's artifact is indexed.
    fn index_problems(&self) -> Result<IndexProblems, StoreError> {
        let mut found = IndexProblems {
            manifests_checked: 0,
            explained: Vec::new(),
            unexplained: Vec::new(),
        };
        for manifest in self.manifests()? {
            found.manifests_checked += 1;
            let source = &manifest.source.blake3;
            if !self.blobs.contains_key(source.as_bytes())? {
                let quarantined = self.root.join("damaged").join(source);
                if quarantined.exists() {
                    found.explained.push(format!(
                        "manifest {} names source blob {source}, which was damaged and moved to \
                         {}; pushing the same .wasm again repairs it",
                        manifest.id(),
                        quarantined.display()
                    ));
                } else {
                    found.unexplained.push(format!(
                        "manifest {} names source blob {source}, which is not indexed",
                        manifest.id()
                    ));
                }
            }
        }
        for entry in self.active.iter() {
            let (k, v) = entry?;
            let name = String::from_utf8_lossy(&k).into_owned();
            let version = decode_version(&v);
            if self.manifest(&name, version)?.is_none() {
                found.unexplained.push(format!(
                    "{name} is active at version {version}, which is not stored"
                ));
            }
        }
        for entry in self.compiled.iter() {
            let (_, v) = entry?;
            let artifact = String::from_utf8_lossy(&v).into_owned();
            if !self.blobs.contains_key(v)? {
                found.unexplained.push(format!(
                    "compiled artifact {artifact} is recorded but not indexed"
                ));
            }
        }
        Ok(found)
    }
}
