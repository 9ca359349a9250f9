//! Restoring deployments: from a manifest to an `InstancePre` a request can instantiate from in
//! microseconds.
//!
//! The engine uses the pooling allocator with copy-on-write memory images, so a fresh instance
//! maps the pre-initialized memory from the `.cwasm` instead of copying it. Artifacts are
//! loaded with `deserialize_file` (mmap: pages are shared between instances and evictable), but
//! only after the store has re-hashed them against their content address. A deployment whose
//! artifacts do not fit this engine (another fingerprint, or a corrupt file) is recompiled from
//! its stored source, and the result is stored for next time.

use std::num::NonZeroUsize;
use std::path::Path;
use std::sync::{Arc, Mutex};

use edged_compiler::{
    CompileOptions, EngineSettings, InitPolicy, Target, WasmKind, base_config, engine_fingerprint,
};
use lru::LruCache;
use serde::{Deserialize, Serialize};
use wasmtime::{Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use crate::manifest::Manifest;
use crate::store::{BlobKind, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("this host's architecture has no edged target")]
    UnsupportedHost,
    #[error("engine configuration rejected: {0}")]
    Engine(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("artifact {artifact} refused: {reason}")]
    Refused { artifact: String, reason: String },
    #[error("recompiling {manifest} from its source failed: {reason}")]
    Recompile { manifest: String, reason: String },
    #[error("linking {what} failed: {reason}")]
    Link { what: String, reason: String },
}

impl RestoreError {
    /// The stored blob whose damage (or absence) this error comes from, if that is the cause:
    /// a fresh copy of it (a re-push, a peer) repairs the deployment.
    pub fn damaged_blob(&self) -> Option<&str> {
        match self {
            RestoreError::Store(e) => e.damaged_blob(),
            _ => None,
        }
    }
}

/// Sizes of the pooling allocator. Every slot reserves `memory_reservation + guard` of virtual
/// address space (not memory), so the totals bound the address space the daemon maps;
/// [`crate::pool`] computes how much, and fits the counts to what the process can reserve.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolSettings {
    /// Instances (core modules, and components) alive at once across all functions.
    pub total_instances: u32,
    /// Linear memories alive at once.
    pub total_memories: u32,
    /// Ceiling for any one linear memory, in bytes; per-function caps sit below it.
    pub max_memory_bytes: usize,
    /// Bytes of each freed memory slot kept resident, so the next instance skips page faults
    /// (and the kernel skips the TLB shootdowns an `madvise` costs a multi-threaded daemon).
    pub keep_resident_bytes: usize,
}

/// Core instance slots per instance slot: a component embeds a handful of core modules (the
/// guest, its libc/adapter shims); a core module guest uses one. Each may have a table, so
/// [`crate::pool`] counts as many table slots.
const CORE_INSTANCES_PER_INSTANCE: u32 = crate::pool::TABLES_PER_INSTANCE;

/// With the kernel's PAGEMAP_SCAN (Linux 6.7+) only pages a guest dirtied are reset, so a large
/// resident budget costs nothing for small guests; without it the first `keep_resident_bytes`
/// are reset with `memset` every time, so the budget must stay small.
fn default_keep_resident() -> usize {
    if PoolingAllocationConfig::is_pagemap_scan_available() {
        16 << 20
    } else {
        64 << 10
    }
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            total_instances: 1000,
            total_memories: 1000,
            max_memory_bytes: 1 << 30,
            keep_resident_bytes: default_keep_resident(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeSettings {
    pub engine: EngineSettings,
    pub pool: PoolSettings,
}

/// The serving engine for this host: the compiler's configuration for the host target plus the
/// pooling allocator. Its fingerprint matches artifacts `edgectl` built for this arch.
pub fn runtime_engine(settings: &RuntimeSettings) -> Result<(Engine, Target), RestoreError> {
    let target = Target::host().ok_or(RestoreError::UnsupportedHost)?;
    let mut config =
        base_config(target, &settings.engine).map_err(|e| RestoreError::Engine(e.to_string()))?;
    let mut pool = PoolingAllocationConfig::new();
    // A component instance holds several core instances (one per core module inside it), each
    // possibly with its own table, but usually one linear memory. Core instance and table slots
    // reserve little address space; memory slots are what cost it.
    let core_slots = settings
        .pool
        .total_instances
        .saturating_mul(CORE_INSTANCES_PER_INSTANCE);
    pool.total_core_instances(core_slots)
        .total_component_instances(settings.pool.total_instances)
        .total_memories(settings.pool.total_memories)
        .total_tables(core_slots)
        // wasmtime's default, named so that `pool`'s address-space arithmetic matches it.
        .table_elements(crate::pool::TABLE_ELEMENTS)
        .total_stacks(settings.pool.total_instances)
        .max_memory_size(settings.pool.max_memory_bytes)
        .linear_memory_keep_resident(settings.pool.keep_resident_bytes)
        .table_keep_resident(settings.pool.keep_resident_bytes)
        .pagemap_scan(wasmtime::Enabled::Auto);
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    let engine = Engine::new(&config).map_err(|e| RestoreError::Engine(format!("{e:#}")))?;
    Ok((engine, target))
}

/// A deployment ready to instantiate.
pub enum Prepared<T: 'static> {
    Module(wasmtime::InstancePre<T>),
    Component(wasmtime::component::InstancePre<T>),
}

/// How [`Restorer::prepare`] got its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadPath {
    /// Already prepared in this process.
    Cached,
    /// Mapped from a stored artifact.
    Loaded,
    /// No stored artifact fitted this engine; compiled from source (and stored).
    Recompiled,
}

/// The host functions guests of each kind are linked against.
pub struct Linkers<T: 'static> {
    pub module: wasmtime::Linker<T>,
    pub component: wasmtime::component::Linker<T>,
}

pub struct Restorer<T: 'static> {
    engine: Engine,
    target: Target,
    fingerprint: String,
    settings: RuntimeSettings,
    linkers: Linkers<T>,
    store: Arc<Store>,
    /// Prepared deployments by artifact hash.
    cache: Mutex<LruCache<String, Arc<Prepared<T>>>>,
}

impl<T: 'static> Restorer<T> {
    /// `engine` must come from [`runtime_engine`] with the same `settings`, and `linkers` must
    /// have been built for it.
    pub fn new(
        engine: Engine,
        settings: RuntimeSettings,
        linkers: Linkers<T>,
        store: Arc<Store>,
        cache_capacity: NonZeroUsize,
    ) -> Result<Restorer<T>, RestoreError> {
        let target = Target::host().ok_or(RestoreError::UnsupportedHost)?;
        Ok(Restorer {
            fingerprint: engine_fingerprint(&engine),
            engine,
            target,
            settings,
            linkers,
            store,
            cache: Mutex::new(LruCache::new(cache_capacity)),
        })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    pub fn target(&self) -> Target {
        self.target
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Drops every prepared deployment (their mappings go once the last instance is gone).
    pub fn clear_cache(&self) {
        self.lock_cache().clear();
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, LruCache<String, Arc<Prepared<T>>>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The prepared form of `manifest` for this host: from the cache, from its artifact for this
    /// engine, or compiled from its source when it has none (or that one is damaged).
    pub fn prepare(
        &self,
        manifest: &Manifest,
    ) -> Result<(Arc<Prepared<T>>, LoadPath), RestoreError> {
        let shipped = manifest
            .artifact_for(self.target, &self.fingerprint)
            .map(|a| a.blake3.clone());
        let compiled = self.store.compiled(
            &manifest.source.blake3,
            manifest.init_func.as_deref(),
            &self.fingerprint,
        )?;
        for hash in shipped.iter().chain(compiled.iter()) {
            if let Some(hit) = self.lock_cache().get(hash) {
                return Ok((hit.clone(), LoadPath::Cached));
            }
        }
        for hash in shipped.iter().chain(compiled.iter()) {
            match self.load_artifact(hash, manifest.kind) {
                Ok(prepared) => return Ok((self.remember(hash, prepared), LoadPath::Loaded)),
                Err(e) => tracing::warn!(
                    manifest = %manifest.id(),
                    artifact = %hash,
                    error = %e,
                    "stored artifact could not be loaded (damaged, unfit for this CPU, or failing \
                     to link); recompiling it from the source"
                ),
            }
        }
        let hash = self.recompile(manifest)?;
        let prepared = self.load_artifact(&hash, manifest.kind)?;
        Ok((self.remember(&hash, prepared), LoadPath::Recompiled))
    }

    fn remember(&self, hash: &str, prepared: Prepared<T>) -> Arc<Prepared<T>> {
        let prepared = Arc::new(prepared);
        self.lock_cache().put(hash.to_string(), prepared.clone());
        prepared
    }

    /// Loads one stored artifact: index lookup, re-hash, ELF target check, `deserialize_file`,
    /// link. Anything that is not this host's complete, untampered artifact is refused.
    pub fn load_artifact(&self, hash: &str, kind: WasmKind) -> Result<Prepared<T>, RestoreError> {
        let (path, meta) = self.store.verified_blob_path(hash)?;
        let refuse = |reason: String| RestoreError::Refused {
            artifact: hash.to_string(),
            reason,
        };
        match &meta.kind {
            BlobKind::Artifact { target, .. } if *target != self.target => {
                return Err(refuse(format!(
                    "it was compiled for {target}; this node is {}",
                    self.target
                )));
            }
            BlobKind::Artifact { .. } => {}
            BlobKind::Source => return Err(refuse("it is a source blob, not an artifact".into())),
        }
        self.load_file(&path, kind).map_err(refuse)
    }

    /// Maps an artifact file the store has just verified (content hash, ELF target, length).
    fn load_file(&self, path: &Path, kind: WasmKind) -> Result<Prepared<T>, String> {
        match kind {
            WasmKind::Module => {
                // SAFETY: `path` is an immutable store blob whose content was just checked
                // against its BLAKE3 name, and which wasmtime produced (an operator-signed
                // deployment or this node's own compile). wasmtime checks its compatibility.
                let module = unsafe { wasmtime::Module::deserialize_file(&self.engine, path) }
                    .map_err(|e| format!("{e:#}"))?;
                self.linkers
                    .module
                    .instantiate_pre(&module)
                    .map(Prepared::Module)
                    .map_err(|e| format!("linking: {e:#}"))
            }
            WasmKind::Component => {
                // SAFETY: as above.
                let component =
                    unsafe { wasmtime::component::Component::deserialize_file(&self.engine, path) }
                        .map_err(|e| format!("{e:#}"))?;
                self.linkers
                    .component
                    .instantiate_pre(&component)
                    .map(Prepared::Component)
                    .map_err(|e| format!("linking: {e:#}"))
            }
        }
    }

    /// Compiles `manifest`'s source for this engine, stores the artifact and records it.
    fn recompile(&self, manifest: &Manifest) -> Result<String, RestoreError> {
        let fail = |reason: String| RestoreError::Recompile {
            manifest: manifest.id(),
            reason,
        };
        let source = self.store.read_blob(&manifest.source.blake3)?;
        let options = CompileOptions {
            init: match &manifest.init_func {
                Some(init) => InitPolicy::Required(init.clone()),
                None => InitPolicy::Skip,
            },
            targets: vec![self.target],
            engine: self.settings.engine.clone(),
            ..CompileOptions::default()
        };
        tracing::info!(manifest = %manifest.id(), "compiling from source for this engine");
        let compiled =
            edged_compiler::compile(&source, &options).map_err(|e| fail(e.to_string()))?;
        let artifact = compiled
            .artifacts
            .into_iter()
            .next()
            .ok_or_else(|| fail("the compiler produced no artifact".into()))?;
        if artifact.fingerprint != self.fingerprint {
            return Err(fail(format!(
                "compiler fingerprint {} differs from the serving engine's {}",
                artifact.fingerprint, self.fingerprint
            )));
        }
        let hash = self.store.put_blob(
            &artifact.bytes,
            BlobKind::Artifact {
                target: self.target,
                fingerprint: artifact.fingerprint.clone(),
            },
            Some(&artifact.blake3),
        )?;
        self.store.record_compiled(
            &manifest.source.blake3,
            manifest.init_func.as_deref(),
            &self.fingerprint,
            &hash,
        )?;
        Ok(hash)
    }
}
