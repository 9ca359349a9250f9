//! The set of functions a node serves: deploying config-declared `.wasm` files into the store,
//! preparing each active version, and routing requests to them.
//!
//! A set is immutable once built; reload builds a new one and swaps it in atomically, so a
//! request always sees one consistent set.

use std::path::PathBuf;

use std::sync::Arc;

use anyhow::{Context, Result};
use edged_artifacts::{BlobKind, LoadPath, Manifest, Restorer, Store};
use edged_compiler::{CompileOptions, EngineSettings, InitPolicy, Target, content_hash};
use edged_node_config::{FunctionConfig, InitSetting, InstanceSetting, Limits};
use tokio::sync::Semaphore;

use crate::guest_output::GuestOutput;
use crate::runtime::{GuestSetup, InstanceEnv, Runtime};
use crate::sandbox::{GuestState, OutboundPolicy};

/// One servable function: its configuration, its active deployment, and how its guests run.
pub struct Function {
    pub config: FunctionConfig,
    pub manifest: Manifest,
    pub runtime: Runtime,
    /// One permit per concurrent request allowed.
    pub permits: Arc<Semaphore>,
}

#[derive(Default)]
pub struct FunctionSet {
    /// Longest route first, so the first match is the most specific.
    functions: Vec<Arc<Function>>,
}

impl FunctionSet {
    pub fn new(mut functions: Vec<Arc<Function>>) -> FunctionSet {
        functions.sort_by_key(|f| std::cmp::Reverse(f.config.route.len()));
        FunctionSet { functions }
    }

    pub fn len(&self) -> usize {
        self.functions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.functions.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Function>> {
        self.functions.iter()
    }

    /// The function serving `path` on `host` (the Host header without port), if any.
    pub fn route(&self, host: Option<&str>, path: &str) -> Option<Arc<Function>> {
        self.functions
            .iter()
            .find(|f| {
                let host_ok = match (&f.config.host, host) {
                    (None, _) => true,
                    (Some(want), Some(got)) => want.eq_ignore_ascii_case(got),
                    (Some(_), None) => false,
                };
                host_ok && route_matches(&f.config.route, path)
            })
            .cloned()
    }
}

/// `/api` serves `/api`, `/api/` and `/api/x`, but not `/apix`.
fn route_matches(route: &str, path: &str) -> bool {
    let route = route.trim_end_matches('/');
    if route.is_empty() {
        return true;
    }
    match path.strip_prefix(route) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// Every stored version of the deployment `name`, oldest first.
fn stored_versions(store: &Store, name: &str) -> Result<Vec<Manifest>> {
    Ok(store
        .manifests()?
        .into_iter()
        .filter(|m| m.name == name)
        .collect())
}

/// Whether `manifest` was pre-initialized as `init` asks (a stored version is reused only then).
fn built_with_init(manifest: &Manifest, init: &InitSetting) -> bool {
    match init {
        InitSetting::Auto => true,
        InitSetting::Func(f) => manifest.init_func.as_deref() == Some(f),
        InitSetting::Off => manifest.init_func.is_none(),
    }
}

/// How the node compiles a declared function for itself: its init setting, this host's target
/// only, the node's engine settings.
fn host_compile_options(
    function: &FunctionConfig,
    engine: &EngineSettings,
) -> Result<CompileOptions> {
    Ok(CompileOptions {
        init: init_policy(&function.init),
        targets: vec![Target::host().context("this host has no edged target")?],
        engine: engine.clone(),
        ..CompileOptions::default()
    })
}

fn init_policy(setting: &InitSetting) -> InitPolicy {
    match setting {
        InitSetting::Auto => InitPolicy::IfExported,
        InitSetting::Func(f) => InitPolicy::Required(f.clone()),
        InitSetting::Off => InitPolicy::Skip,
    }
}

/// Makes sure the store holds and activates a deployment of `function`'s `.wasm`: reuses a
/// stored version built from the same bytes with the same init setting, else compiles and
/// stores a new version. Returns the active manifest.
///
/// The config's `.wasm` is the source's original, so a stored source that fails its hash is
/// replaced from it here (logged), and a damaged artifact is then recompiled from the repaired
/// source when the function is prepared: one damaged file never stops the node.
pub fn ensure_deployed(
    store: &Store,
    engine: &EngineSettings,
    function: &FunctionConfig,
) -> Result<Manifest> {
    let manifest = if function.middleware.is_empty() {
        single_manifest(store, engine, function)?
    } else {
        chain_manifest(store, engine, function)?
    };
    if store.active_version(&manifest.name)? != Some(manifest.version) {
        store.activate(&manifest.name, manifest.version)?;
    }
    Ok(manifest)
}

/// The next version of a deployment whose stored versions are `versions`, and now (Unix
/// seconds) as its creation time.
fn next_version(versions: &[Manifest]) -> (u64, u64) {
    let version = versions.iter().map(|m| m.version).max().unwrap_or(0) + 1;
    let created_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    (version, created_at)
}

/// [`ensure_deployed`]'s manifest for a function without middleware: a stored version built
/// from the same bytes with the same init setting (its source repaired if damaged), else a new
/// version compiled and stored.
fn single_manifest(
    store: &Store,
    engine: &EngineSettings,
    function: &FunctionConfig,
) -> Result<Manifest> {
    let input = std::fs::read(&function.wasm)
        .with_context(|| format!("reading {}", function.wasm.display()))?;
    let (_, binary) = edged_compiler::to_binary(&input)
        .with_context(|| format!("{} is not usable", function.wasm.display()))?;
    let source_hash = content_hash(&binary);
    let versions = stored_versions(store, &function.name)?;
    let reusable = versions
        .iter()
        .rev()
        .find(|m| m.source.blake3 == source_hash && built_with_init(m, &function.init));
    let manifest = match reusable {
        Some(m) => {
            repair_source(store, function, &binary, &source_hash)?;
            m.clone()
        }
        None => {
            let options = host_compile_options(function, engine)?;
            let compiled = edged_compiler::compile(&binary, &options)
                .with_context(|| format!("compiling {}", function.wasm.display()))?;
            let (version, created_at) = next_version(&versions);
            let manifest = Manifest::from_compiled(&function.name, version, created_at, &compiled);
            store.put_compiled(&compiled, &manifest)?;
            tracing::info!(function = %function.name, version, "compiled and stored");
            manifest
        }
    };
    Ok(manifest)
}

/// [`ensure_deployed`]'s manifest for a function with `middleware`: reuses a stored version composed from
/// the same parts (by content, in the same order) with the same init setting whose composite is
/// intact, else composes, compiles and stores a new version (the parts as source blobs).
fn chain_manifest(
    store: &Store,
    engine: &EngineSettings,
    function: &FunctionConfig,
) -> Result<Manifest> {
    let (paths, parts) = read_chain(function)?;
    let hashes: Vec<String> = parts.iter().map(|(_, b)| content_hash(b)).collect();
    let versions = stored_versions(store, &function.name)?;
    let reusable = versions.iter().rev().find(|m| {
        m.part_refs().iter().map(|p| &p.blake3).eq(hashes.iter())
            && built_with_init(m, &function.init)
            // The composite has no file of its own to repair from: a damaged one is composed
            // again, as a new version.
            && store.check_blob(&m.source.blake3).is_ok()
    });
    let manifest = match reusable {
        Some(m) => {
            for ((_, binary), (path, hash)) in parts.iter().zip(paths.iter().zip(&hashes)) {
                let part = FunctionConfig {
                    wasm: path.to_path_buf(),
                    ..function.clone()
                };
                repair_source(store, &part, binary, hash)?;
            }
            m.clone()
        }
        None => {
            let options = host_compile_options(function, engine)?;
            let (middleware, app) = part_inputs(&parts);
            let (compiled, composed) = edged_compiler::compile_chain(&middleware, app, &options)
                .with_context(|| format!("composing the chain of function `{}`", function.name))?;
            for warning in &compiled.warnings {
                tracing::warn!(function = %function.name, "{warning}");
            }
            let (version, created_at) = next_version(&versions);
            let manifest = Manifest::from_chain(
                &function.name,
                version,
                created_at,
                &compiled,
                &composed.parts,
            );
            store.put_chain(&compiled, &composed.parts, &manifest)?;
            tracing::info!(function = %function.name, version, parts = paths.len(), "composed, compiled and stored");
            manifest
        }
    };
    Ok(manifest)
}

/// A chain part as read: its name (the file name) and its binary.
pub type ChainPart = (String, Vec<u8>);

/// The parts of `function`'s chain, its middleware first and its `.wasm` last: each part's path,
/// and its name with its binary (WAT turned into one).
pub fn read_chain(function: &FunctionConfig) -> Result<(Vec<PathBuf>, Vec<ChainPart>)> {
    let paths: Vec<PathBuf> = function
        .middleware
        .iter()
        .chain(std::iter::once(&function.wasm))
        .cloned()
        .collect();
    let mut parts = Vec::with_capacity(paths.len());
    for path in &paths {
        let input = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let (_, binary) = edged_compiler::to_binary(&input)
            .with_context(|| format!("{} is not usable", path.display()))?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        parts.push((name, binary.into_owned()));
    }
    Ok((paths, parts))
}

/// [`read_chain`]'s parts as the composer takes them: the middleware, and the app.
pub fn part_inputs(
    parts: &[ChainPart],
) -> (
    Vec<edged_compiler::PartInput<'_>>,
    edged_compiler::PartInput<'_>,
) {
    let (app, middleware) = parts.split_last().expect("a chain has an app");
    let middleware = middleware
        .iter()
        .map(|(name, bytes)| edged_compiler::PartInput { name, bytes })
        .collect();
    let app = edged_compiler::PartInput {
        name: &app.0,
        bytes: &app.1,
    };
    (middleware, app)
}

/// Re-hashes the stored source `hash` of config function `function` and, if it is damaged or
/// gone, stores `binary` (the config's `.wasm`, which hashes to `hash`) in its place.
fn repair_source(
    store: &Store,
    function: &FunctionConfig,
    binary: &[u8],
    hash: &str,
) -> Result<()> {
    let damage = match store.check_blob(hash) {
        Ok(_) => return Ok(()),
        Err(e) if e.damaged_blob().is_some() => e,
        Err(e) => return Err(e.into()),
    };
    tracing::warn!(
        function = %function.name,
        blob = %hash,
        "stored source is damaged ({damage}); restoring it from {}",
        function.wasm.display()
    );
    store
        .put_blob(binary, BlobKind::Source, Some(hash))
        .with_context(|| format!("restoring source blob {hash} of `{}`", function.name))?;
    tracing::info!(function = %function.name, blob = %hash, "source blob repaired from the config's .wasm");
    Ok(())
}

/// The function a pushed deployment becomes: its route and limits from the manifest, and no
/// capabilities (pushed functions get no preopens, environment or outbound hosts).
///
/// A manifest's limits are signed but not range-checked the way a config file is, so each is
/// clamped into the config file's range (never wrapped into a tiny limit), with a warning naming
/// the deployment. Clamping rather than refusing keeps a signed, admitted deployment servable.
pub fn pushed_function_config(manifest: &Manifest) -> FunctionConfig {
    let limits = match manifest.limits {
        Some(l) => {
            let (limits, notes) = Limits::clamped(edged_node_config::LimitUnits {
                memory_mib: l.memory_mib,
                timeout_ms: l.timeout_ms,
                max_concurrency: l.max_concurrency,
                max_body_kib: l.max_body_kib,
            });
            for note in notes {
                tracing::warn!(deployment = %manifest.id(), "pushed limit clamped: {note}");
            }
            limits
        }
        None => Limits::default(),
    };
    let reuse = manifest.instances.unwrap_or_default();
    let (instances, notes) =
        InstanceSetting::clamped(reuse.requests, reuse.concurrent, reuse.idle_timeout_ms);
    for note in notes {
        tracing::warn!(deployment = %manifest.id(), "pushed instance setting clamped: {note}");
    }
    FunctionConfig {
        name: manifest.name.clone(),
        wasm: std::path::PathBuf::new(),
        route: pushed_route(manifest),
        host: None,
        init: InitSetting::Auto,
        limits,
        instances,
        env: Default::default(),
        dirs: Vec::new(),
        outbound_hosts: Vec::new(),
        middleware: Vec::new(),
    }
}

/// The route a pushed deployment serves: the one its manifest names, else `/<name>`.
pub fn pushed_route(manifest: &Manifest) -> String {
    manifest
        .route
        .clone()
        .unwrap_or_else(|| format!("/{}", manifest.name))
}

/// Deploys (if needed) and prepares a config-declared function. Blocking: compiles and maps.
pub fn prepare_declared(
    restorer: &Restorer<GuestState>,
    engine: &EngineSettings,
    config: &FunctionConfig,
    env: InstanceEnv,
) -> Result<(Function, LoadPath)> {
    let manifest = ensure_deployed(restorer.store(), engine, config)
        .with_context(|| format!("function `{}`", config.name))?;
    prepare(restorer, config, manifest, env)
}

/// Prepares `manifest` as the function `config`. Blocking: maps (or compiles) the artifact.
/// Returns how the artifact was had (cached, mapped, recompiled), for the cold-load metric.
pub fn prepare(
    restorer: &Restorer<GuestState>,
    config: &FunctionConfig,
    manifest: Manifest,
    env: InstanceEnv,
) -> Result<(Function, LoadPath)> {
    let (prepared, how) = restorer
        .prepare(&manifest)
        .with_context(|| format!("function `{}`: preparing {}", config.name, manifest.id()))?;
    let setup = GuestSetup {
        engine: restorer.engine().clone(),
        config: config.clone(),
        outbound: OutboundPolicy::new(config.outbound_hosts.clone()),
        output: GuestOutput::new(&config.name),
        env,
    };
    let (runtime, notes) =
        Runtime::new(&prepared, manifest.guest_kind(), setup).with_context(|| {
            format!(
                "function `{}`: {} exports neither wasi:http/handler@0.3.0 nor \
                 wasi:http/incoming-handler@0.2 in a form this node links",
                config.name,
                manifest.id()
            )
        })?;
    for note in notes {
        tracing::warn!(function = %config.name, deployment = %manifest.id(), "{note}");
    }
    if how != LoadPath::Cached {
        tracing::info!(
            function = %config.name,
            deployment = %manifest.id(),
            route = %config.route,
            kind = %runtime.guest_kind(),
            requests_per_instance = runtime.policy().requests_per_instance,
            load = ?how,
            "function ready"
        );
    }
    let function = Function {
        config: config.clone(),
        manifest,
        runtime,
        permits: Arc::new(Semaphore::new(config.limits.max_concurrency)),
    };
    Ok((function, how))
}

#[cfg(test)]
mod tests {
    use super::route_matches;

    #[test]
    fn prefix_routes_respect_segments() {
        assert!(route_matches("/api", "/api"));
        assert!(route_matches("/api", "/api/"));
        assert!(route_matches("/api/", "/api/v1"));
        assert!(!route_matches("/api", "/apix"));
        assert!(route_matches("/", "/anything"));
    }
}
