//! # edged-compiler
//!
//! Owns the path from the `.wasm` an operator hands us to native code a node can map and run:
//!
//! 1. **inspect** — is it a core module (WASI preview 1), a `wasi:http@0.2` component or a
//!    `wasi:http@0.3` one ([`GuestKind`])? Is it valid? (WAT text is accepted too and turned
//!    into a binary first.)
//! 2. **pre-initialize** — if it exports an init function, run it once under Wizer with every
//!    import trapping, and snapshot the initialized memory and globals into a new module.
//! 3. **AOT-compile** — Cranelift, once per [`Target`], with that target's documented CPU
//!    baseline and the engine settings from [`target::base_config`].
//!
//! Output is deterministic: the same input and [`CompileOptions`] give byte-identical artifacts.
//! The node runs the same pipeline when it has to recompile a deployment from its source.

mod compose;
mod fingerprint;
mod guest_kind;
pub mod memory_image;
mod preinit;
pub mod target;

use std::borrow::Cow;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use wasmtime::Engine;

pub use compose::{
    ComposeError, Composed, ComposedPart, NODE_IMPORTS_RULE, PartInput, PartRole, Refusal,
    check_chain, compose_chain, node_provides,
};
pub use fingerprint::engine_fingerprint;
pub use guest_kind::{GuestKind, component_exports, component_imports, guest_kind};
pub use memory_image::MemoryImageReport;
pub use preinit::exports_function;
pub use target::{EngineSettings, Target, base_config};

/// The export Wizer looks for unless told otherwise.
pub const DEFAULT_INIT_FUNC: &str = "wizer-initialize";

#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error("input is not WebAssembly: {0}")]
    NotWasm(String),
    #[error("invalid {kind}: {reason}")]
    Invalid { kind: WasmKind, reason: String },
    #[error(
        "unsupported target `{0}` (supported: x86_64-unknown-linux-gnu, aarch64-unknown-linux-gnu)"
    )]
    UnsupportedTarget(String),
    #[error("init function `{0}` is not exported by the input")]
    MissingInitFunc(String),
    #[error(
        "init function `{init}` called import `{import}`: imports (WASI clocks, random, I/O…) are not \
         available during pre-initialization; move that work out of `{init}` and into the request path"
    )]
    InitCalledImport { init: String, import: String },
    #[error("init function `{init}` did not finish within {timeout:?}")]
    InitTimeout { init: String, timeout: Duration },
    #[error("pre-initialization with init function `{init}` failed: {reason}")]
    Preinit { init: String, reason: String },
    #[error("compiling for {target} failed: {reason}")]
    Codegen { target: Target, reason: String },
    #[error("engine configuration for {target} rejected: {reason}")]
    Engine { target: Target, reason: String },
}

/// What kind of Wasm binary an input is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WasmKind {
    /// A core module; edged runs these as WASI preview 1 commands.
    Module,
    /// A component; edged runs these as `wasi:http` 0.2 or 0.3 (see [`GuestKind`]).
    Component,
}

impl std::fmt::Display for WasmKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WasmKind::Module => "core module",
            WasmKind::Component => "component",
        })
    }
}

/// How to pre-initialize.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum InitPolicy {
    /// Run Wizer if the input exports [`DEFAULT_INIT_FUNC`]; otherwise compile as is.
    IfExported,
    /// Run Wizer with this export; it is an error if the input does not export it.
    Required(String),
    /// Never run Wizer.
    Skip,
}

#[derive(Debug, Clone)]
pub struct CompileOptions {
    pub init: InitPolicy,
    pub targets: Vec<Target>,
    pub engine: EngineSettings,
    /// Wall-clock budget for the init function; a runaway init is cut off at this point.
    pub init_timeout: Duration,
    /// Linear memory the init function may grow to, in bytes.
    pub init_memory_limit: usize,
}

impl Default for CompileOptions {
    fn default() -> Self {
        CompileOptions {
            init: InitPolicy::IfExported,
            targets: Target::ALL.to_vec(),
            engine: EngineSettings::default(),
            init_timeout: Duration::from_secs(60),
            init_memory_limit: 1 << 30,
        }
    }
}

/// One native artifact for one target.
#[derive(Debug, Clone)]
pub struct Artifact {
    pub target: Target,
    /// [`engine_fingerprint`] of the engine that produced it; a node loads the artifact directly
    /// only when its own engine has the same fingerprint.
    pub fingerprint: String,
    pub blake3: String,
    pub bytes: Vec<u8>,
}

/// Wall-clock time of each step, in order.
#[derive(Debug, Clone, Default)]
pub struct StepTimings(pub Vec<(String, Duration)>);

impl StepTimings {
    fn record<T>(&mut self, step: impl Into<String>, f: impl FnOnce() -> T) -> T {
        let start = Instant::now();
        let out = f();
        self.0.push((step.into(), start.elapsed()));
        out
    }
}

#[derive(Debug, Clone)]
pub struct Compiled {
    pub kind: WasmKind,
    pub guest: GuestKind,
    /// The input as a Wasm binary (WAT is converted): what a node recompiles from.
    pub source: Vec<u8>,
    /// The init function that was run, if Wizer ran.
    pub init_func: Option<String>,
    /// The module or component that was compiled (the Wizer snapshot when Wizer ran).
    pub preinitialized: Vec<u8>,
    pub artifacts: Vec<Artifact>,
    pub timings: StepTimings,
    /// What the build chose not to do, one line each (e.g. why Wizer was skipped).
    pub warnings: Vec<String>,
}

/// BLAKE3 of `bytes` as lowercase hex: the content address used throughout edged.
pub fn content_hash(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

/// Turns WAT text into a binary and tells a module from a component. Does not validate. A
/// binary input is borrowed, not copied (stores check 50 MB uploads with this).
pub fn to_binary(input: &[u8]) -> Result<(WasmKind, Cow<'_, [u8]>), CompileError> {
    let bytes = if input.starts_with(b"\0asm") {
        Cow::Borrowed(input)
    } else if std::str::from_utf8(input).is_ok() {
        wat::parse_bytes(input)
            .map_err(|e| CompileError::NotWasm(format!("WAT text does not parse: {e}")))?
    } else {
        let shown = input.len().min(8);
        return Err(CompileError::NotWasm(format!(
            "expected the `\\0asm` magic, found {:02x?} ({} bytes total)",
            &input[..shown],
            input.len()
        )));
    };
    let kind = if wasmparser::Parser::is_component(&bytes) {
        WasmKind::Component
    } else if wasmparser::Parser::is_core_wasm(&bytes) {
        WasmKind::Module
    } else {
        return Err(CompileError::NotWasm(
            "unknown WebAssembly binary version (neither a core module nor a component)".into(),
        ));
    };
    Ok((kind, bytes))
}

/// An engine for `target` with the compiler's settings. Compiling needs no runtime state.
pub fn engine_for(target: Target, settings: &EngineSettings) -> Result<Engine, CompileError> {
    let config = base_config(target, settings)?;
    Engine::new(&config).map_err(|e| CompileError::Engine {
        target,
        reason: format!("{e:#}"),
    })
}

/// Validates `bytes` against the features edged's engines accept; the reason names the offset
/// where the validator gives one.
pub fn validate(engine: &Engine, kind: WasmKind, bytes: &[u8]) -> Result<(), CompileError> {
    let result = match kind {
        WasmKind::Module => wasmtime::Module::validate(engine, bytes),
        // wasmtime has no validate-only entry point for components; wasmparser's defaults
        // match the proposals wasmtime enables, and codegen re-checks against the engine.
        WasmKind::Component => wasmparser::Validator::new()
            .validate_all(bytes)
            .map(|_| ())
            .map_err(wasmtime::Error::from),
    };
    result.map_err(|e| CompileError::Invalid {
        kind,
        reason: format!("{e:#}"),
    })
}

/// Compiles `bytes` (already pre-initialized or not) for `engine`'s target.
pub fn precompile(
    engine: &Engine,
    target: Target,
    kind: WasmKind,
    bytes: &[u8],
) -> Result<Vec<u8>, CompileError> {
    let result = match kind {
        WasmKind::Module => engine.precompile_module(bytes),
        WasmKind::Component => engine.precompile_component(bytes),
    };
    result.map_err(|e| CompileError::Codegen {
        target,
        reason: format!("{e:#}"),
    })
}

/// Version of this crate's pipeline, for callers that cache its output (`edgectl`): together with
/// the [`engine_fingerprint`] (which covers the wasmtime and Wizer version and every code-affecting
/// engine setting) it names everything besides the input and [`CompileOptions`] that decides the
/// output. Bump the `+pipeline.N` part when a change here changes output for the same input.
pub const PIPELINE_VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "+pipeline.2");

/// The input after inspection, validation and pre-initialization: what every target compiles.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub kind: WasmKind,
    pub guest: GuestKind,
    /// The input as a Wasm binary (WAT is converted).
    pub source: Vec<u8>,
    /// The init function that was run, if Wizer ran.
    pub init_func: Option<String>,
    /// The Wizer snapshot when Wizer ran, else the source.
    pub preinitialized: Vec<u8>,
    pub timings: StepTimings,
    /// What the build chose not to do, one line each (e.g. why Wizer was skipped).
    pub warnings: Vec<String>,
}

/// The target whose engine validates the input and runs its init function: the host when edged
/// supports it, else the first requested target.
pub fn run_target(options: &CompileOptions) -> Target {
    Target::host().unwrap_or(options.targets[0])
}

/// The first half of [`compile`]: inspect, validate, pre-initialize.
pub fn prepare(input: &[u8], options: &CompileOptions) -> Result<Prepared, CompileError> {
    let run_engine = engine_for(run_target(options), &options.engine)?;
    prepare_with(&run_engine, input, options)
}

fn prepare_with(
    run_engine: &Engine,
    input: &[u8],
    options: &CompileOptions,
) -> Result<Prepared, CompileError> {
    let mut timings = StepTimings::default();
    let (kind, source) = to_binary(input)?;
    timings.record("validate", || validate(run_engine, kind, &source))?;
    let guest = guest_kind(kind, &source)?;
    let mut warnings = Vec::new();

    let init_func = match &options.init {
        InitPolicy::Skip => None,
        InitPolicy::Required(name) => {
            if !preinit::exports_func(kind, &source, name) {
                return Err(CompileError::MissingInitFunc(name.clone()));
            }
            Some(name.clone())
        }
        InitPolicy::IfExported => preinit::exports_func(kind, &source, DEFAULT_INIT_FUNC)
            .then(|| DEFAULT_INIT_FUNC.to_string()),
    };
    let snapshot = init_func.as_ref().map(|init| {
        timings.record(format!("wizer ({init})"), || {
            preinit::preinitialize(run_engine, kind, &source, init, options)
        })
    });
    let (init_func, preinitialized) = match snapshot {
        None => (None, source.to_vec()),
        Some(Ok(snapshot)) => (init_func, snapshot),
        // Wizer cannot yet snapshot every wasi:http 0.3 component (the async ABI's tasks and
        // streams are state it does not capture). Unless the operator asked for this init
        // function by name, such a guest is still worth serving, just without pre-initialization.
        Some(Err(CompileError::Preinit { init, reason }))
            if guest == GuestKind::HttpP3 && options.init == InitPolicy::IfExported =>
        {
            warnings.push(format!(
                "not pre-initialized: Wizer cannot snapshot this wasi:http 0.3 component                  ({init}: {reason}); it runs `{init}` never, and starts from its data segments"
            ));
            (None, source.to_vec())
        }
        Some(Err(e)) => return Err(e),
    };
    Ok(Prepared {
        kind,
        guest,
        source: source.into_owned(),
        init_func,
        preinitialized,
        timings,
        warnings,
    })
}

/// The second half of [`compile`] for one target: AOT-compiles `prepared` (a pre-initialized
/// module or component of `kind`) with `engine`, which must be an [`engine_for`] `target`.
pub fn compile_target(
    engine: &Engine,
    target: Target,
    kind: WasmKind,
    prepared: &[u8],
) -> Result<Artifact, CompileError> {
    let bytes = precompile(engine, target, kind, prepared)?;
    Ok(Artifact {
        target,
        fingerprint: engine_fingerprint(engine),
        blake3: content_hash(&bytes),
        bytes,
    })
}

/// The whole pipeline: inspect, validate, pre-initialize, AOT-compile for each target.
pub fn compile(input: &[u8], options: &CompileOptions) -> Result<Compiled, CompileError> {
    // The host engine (or the first target's) validates, runs the init function, and compiles
    // its own target.
    let run_target = run_target(options);
    let run_engine = engine_for(run_target, &options.engine)?;
    let Prepared {
        kind,
        guest,
        source,
        init_func,
        preinitialized,
        mut timings,
        warnings,
    } = prepare_with(&run_engine, input, options)?;

    let mut artifacts = Vec::with_capacity(options.targets.len());
    for &target in &options.targets {
        let engine = if target == run_target {
            run_engine.clone()
        } else {
            engine_for(target, &options.engine)?
        };
        artifacts.push(timings.record(format!("aot {target}"), || {
            compile_target(&engine, target, kind, &preinitialized)
        })?);
    }
    Ok(Compiled {
        kind,
        guest,
        source,
        init_func,
        preinitialized,
        artifacts,
        timings,
        warnings,
    })
}

/// A middleware chain through the whole pipeline: [`compose_chain`] (which pre-initializes each
/// part), then AOT-compiles the composite for each target. The [`Compiled::source`] is the
/// composite, which a node recompiles as it is; the parts are in the returned [`Composed`].
pub fn compile_chain(
    middleware: &[PartInput<'_>],
    app: PartInput<'_>,
    options: &CompileOptions,
) -> Result<(Compiled, Composed), ComposeError> {
    let started = Instant::now();
    let composed = compose_chain(middleware, app, options)?;
    let composed_in = started.elapsed();
    let mut compiled = compile(
        &composed.bytes,
        &CompileOptions {
            init: InitPolicy::Skip,
            ..options.clone()
        },
    )?;
    compiled
        .timings
        .0
        .insert(0, ("compose".into(), composed_in));
    compiled
        .warnings
        .splice(0..0, composed.warnings.iter().cloned());
    Ok((compiled, composed))
}
