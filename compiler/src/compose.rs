//! Middleware chains: several `wasi:http@0.3` components composed into one, so a request flows
//! through them at the cost of a function call per hop.
//!
//! A chain is middlewares (outermost first) in front of an app. A middleware targets the
//! `wasi:http/middleware` world: it imports `wasi:http/handler` (the next part) and exports it.
//! The app targets `wasi:http/service`: it exports `wasi:http/handler` and imports no handler.
//! Composition is what `wac plug` does, with the Bytecode Alliance's `wac-graph`: each
//! middleware's imported handler is plugged with the next part's exported one, the outermost
//! part's handler is the composite's only export, and every other import of every part (WASI,
//! `wasi:http` types and client) becomes an import of the composite, shared by all parts.
//!
//! Each part is checked before anything is composed, and refused with its name and the reason
//! (see [`Refusal`]). Each part is pre-initialized on its own first, where it allows (Wizer runs
//! on a part that exports `wizer-initialize`, as for a single component; a part Wizer cannot
//! snapshot is composed as it is, with a warning): a composite has no init export of its own.
//!
//! Composition is deterministic: the same parts in the same order give the same bytes.

use wac_graph::types::Package;
use wac_graph::{CompositionGraph, EncodeOptions};
use wasmtime::Engine;

use crate::{
    CompileError, CompileOptions, GuestKind, InitPolicy, WasmKind, component_exports,
    component_imports, content_hash, engine_for, guest_kind, prepare_with, run_target, to_binary,
    validate,
};

/// The interface a chain is built from, without its version: every part exports it and every
/// middleware imports it.
const HANDLER: &str = "wasi:http/handler@";
/// The `wasi:http` versions a chain can be built from (any 0.3.x patch version).
const HANDLER_P3: &str = "wasi:http/handler@0.3.";

/// The rule for what a part may import besides the handler a middleware imports: what every
/// edged node links a `wasi:http` component against. WASI 0.3 and 0.2 `cli`, `clocks`,
/// `filesystem`, `random` and `sockets`; WASI 0.2 `io`; `wasi:http` 0.3 `types` and `client`
/// and 0.2 `types` and `outgoing-handler`. Anything else (another package, a handler import on
/// the app, an unreleased WASI version) has nothing to link to on a node.
pub const NODE_IMPORTS_RULE: &str = "WASI 0.2/0.3 cli, clocks, filesystem, random and sockets, \
    WASI 0.2 io, and wasi:http 0.3 types and client (0.2: types and outgoing-handler)";

/// Whether a node satisfies an import named `name` (see [`NODE_IMPORTS_RULE`]).
pub fn node_provides(name: &str) -> bool {
    let Some((path, version)) = name.split_once('@') else {
        return false;
    };
    let Some((package, interface)) = path.split_once('/') else {
        return false;
    };
    let p3 = version.starts_with("0.3.");
    let p2 = version.starts_with("0.2.");
    match package {
        "wasi:cli" | "wasi:clocks" | "wasi:filesystem" | "wasi:random" | "wasi:sockets" => p3 || p2,
        "wasi:io" => p2,
        "wasi:http" => match interface {
            "types" => p3 || p2,
            "client" => p3,
            "outgoing-handler" => p2,
            _ => false,
        },
        _ => false,
    }
}

/// What a part is in its chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PartRole {
    /// Imports and exports `wasi:http/handler`; sits in front of the next part.
    Middleware,
    /// Exports `wasi:http/handler`; the end of the chain.
    App,
}

impl std::fmt::Display for PartRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PartRole::Middleware => "middleware",
            PartRole::App => "app",
        })
    }
}

/// One input of a chain, as the operator names it (the file name, usually).
#[derive(Debug, Clone, Copy)]
pub struct PartInput<'a> {
    pub name: &'a str,
    /// A binary component (or WAT text).
    pub bytes: &'a [u8],
}

/// Why a part cannot be in a chain. Each is shown with the part's name and place.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{0}")]
    NotWasm(String),
    #[error("it is not valid: {0}")]
    Invalid(String),
    #[error(
        "it is a core module (WASI preview 1), not a wasi:http 0.3 component; only wasi:http 0.3 \
         components can be chained"
    )]
    CoreModule,
    #[error(
        "it is a wasi:http 0.2 component (it exports wasi:http/incoming-handler@0.2.x), not a \
         wasi:http 0.3 one; wasi:http 0.2 has no middleware world, so only 0.3 components can be \
         chained"
    )]
    HttpP2,
    #[error(
        "it does not export `wasi:http/handler@0.3.x`, so it cannot be called; it exports {exports}"
    )]
    NoHandlerExport { exports: String },
    #[error(
        "it does not import `wasi:http/handler@0.3.x`, so nothing can be plugged behind it: a \
         middleware targets the wasi:http/middleware world (a service like this one can only be \
         the app, last in the chain)"
    )]
    NoHandlerImport,
    #[error(
        "it imports `{import}`, which the chain cannot satisfy: an app's handler import would be \
         left to the node, which provides none (only a middleware's is plugged)"
    )]
    AppImportsHandler { import: String },
    #[error(
        "it imports `{import}`, which neither the chain nor a node provides (a node provides {})",
        NODE_IMPORTS_RULE
    )]
    UnsatisfiedImport { import: String },
    #[error("it exports both `{0}` and `{1}`; a chain needs exactly one wasi:http handler")]
    AmbiguousHandler(String, String),
}

/// Why a chain was not composed.
#[derive(Debug, thiserror::Error)]
pub enum ComposeError {
    #[error("{role} `{name}` (part {position} of {total}): {reason}")]
    Refused {
        name: String,
        role: PartRole,
        /// 1-based, outermost first.
        position: usize,
        total: usize,
        reason: Refusal,
    },
    #[error("pre-initializing {role} `{name}`: {source}")]
    Preinit {
        name: String,
        role: PartRole,
        source: CompileError,
    },
    #[error("composing the chain failed: {0}")]
    Compose(String),
    #[error(transparent)]
    Compile(#[from] CompileError),
}

/// One part of a composed chain.
#[derive(Debug, Clone)]
pub struct ComposedPart {
    pub name: String,
    pub role: PartRole,
    /// The part as a Wasm binary (WAT is converted): what the manifest names and a node keeps.
    pub source: Vec<u8>,
    pub blake3: String,
    /// The init function Wizer ran on this part, if it did.
    pub init_func: Option<String>,
}

/// A composed chain, ready for [`crate::compile`] (it has no init export of its own).
#[derive(Debug, Clone)]
pub struct Composed {
    /// The composite component: the pre-initialized parts, plugged.
    pub bytes: Vec<u8>,
    /// Outermost first; the app last.
    pub parts: Vec<ComposedPart>,
    /// What the build chose not to do, one line each, naming the part.
    pub warnings: Vec<String>,
}

/// The part's handler import and export names, after checking it can play `role`.
struct Checked {
    import: Option<String>,
    export: String,
}

fn check_part(
    role: PartRole,
    engine: &Engine,
    bytes: &[u8],
) -> Result<(Vec<u8>, Checked), Refusal> {
    let (kind, source) = to_binary(bytes).map_err(|e| Refusal::NotWasm(e.to_string()))?;
    if kind == WasmKind::Module {
        return Err(Refusal::CoreModule);
    }
    validate(engine, kind, &source).map_err(|e| match e {
        CompileError::Invalid { reason, .. } => Refusal::Invalid(reason),
        other => Refusal::Invalid(other.to_string()),
    })?;
    let exports = component_exports(&source);
    let handlers: Vec<&String> = exports.iter().filter(|e| e.starts_with(HANDLER)).collect();
    let export = match handlers.as_slice() {
        [one] if one.starts_with(HANDLER_P3) => (*one).clone(),
        [a, b, ..] => return Err(Refusal::AmbiguousHandler((*a).clone(), (*b).clone())),
        _ => {
            if matches!(guest_kind(kind, &source), Ok(GuestKind::HttpP2)) {
                return Err(Refusal::HttpP2);
            }
            let exports = if exports.is_empty() {
                "nothing".to_string()
            } else {
                exports
                    .iter()
                    .map(|e| format!("`{e}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return Err(Refusal::NoHandlerExport { exports });
        }
    };
    let mut import = None;
    for name in component_imports(&source) {
        if name.starts_with(HANDLER) {
            match role {
                PartRole::App => return Err(Refusal::AppImportsHandler { import: name }),
                PartRole::Middleware if name.starts_with(HANDLER_P3) && import.is_none() => {
                    import = Some(name);
                }
                PartRole::Middleware => return Err(Refusal::UnsatisfiedImport { import: name }),
            }
        } else if !node_provides(&name) {
            return Err(Refusal::UnsatisfiedImport { import: name });
        }
    }
    if role == PartRole::Middleware && import.is_none() {
        return Err(Refusal::NoHandlerImport);
    }
    Ok((source.into_owned(), Checked { import, export }))
}

/// The checks [`compose_chain`] makes of every part before it pre-initializes any (each a
/// `wasi:http` 0.3 component; a middleware imports and exports the handler, the app exports
/// it; nothing else imported that a node does not link): what `edged check-config` asks, with
/// no Wizer run and no compile.
pub fn check_chain(
    middleware: &[PartInput<'_>],
    app: PartInput<'_>,
    options: &CompileOptions,
) -> Result<(), ComposeError> {
    let run_engine = engine_for(run_target(options), &options.engine)?;
    checked_parts(&run_engine, middleware, &app).map(drop)
}

/// A part that passed [`check_part`]: its role, name, binary and handler names.
type CheckedPart<'a> = (PartRole, &'a str, Vec<u8>, Checked);

/// Every part checked ([`check_part`]), in chain order, or the first refusal naming its part.
fn checked_parts<'a>(
    run_engine: &Engine,
    middleware: &'a [PartInput<'a>],
    app: &'a PartInput<'a>,
) -> Result<Vec<CheckedPart<'a>>, ComposeError> {
    let total = middleware.len() + 1;
    let inputs = middleware
        .iter()
        .map(|p| (PartRole::Middleware, p))
        .chain(std::iter::once((PartRole::App, app)));
    let mut checked = Vec::with_capacity(total);
    for (i, (role, part)) in inputs.enumerate() {
        let (source, names) =
            check_part(role, run_engine, part.bytes).map_err(|reason| ComposeError::Refused {
                name: part.name.to_string(),
                role,
                position: i + 1,
                total,
                reason,
            })?;
        checked.push((role, part.name, source, names));
    }
    Ok(checked)
}

/// Checks, pre-initializes and composes `middleware` (outermost first) in front of `app`.
/// `options.init` applies to each part: `Skip` pre-initializes none, `IfExported` each that
/// exports `wizer-initialize`, `Required(f)` requires the app to export `f` (middlewares are
/// pre-initialized if they export `wizer-initialize`).
pub fn compose_chain(
    middleware: &[PartInput<'_>],
    app: PartInput<'_>,
    options: &CompileOptions,
) -> Result<Composed, ComposeError> {
    let run_engine = engine_for(run_target(options), &options.engine)?;
    let total = middleware.len() + 1;
    // Every part is checked before any is pre-initialized: a refusal costs no Wizer run.
    let checked = checked_parts(&run_engine, middleware, &app)?;

    let mut parts = Vec::with_capacity(total);
    let mut prepared = Vec::with_capacity(total);
    let mut warnings = Vec::new();
    for (role, name, source, names) in checked {
        let init = match (&options.init, role) {
            (InitPolicy::Skip, _) => InitPolicy::Skip,
            (InitPolicy::Required(f), PartRole::App) => InitPolicy::Required(f.clone()),
            _ => InitPolicy::IfExported,
        };
        let part_options = CompileOptions {
            init,
            ..options.clone()
        };
        let p = prepare_with(&run_engine, &source, &part_options).map_err(|source| {
            ComposeError::Preinit {
                name: name.to_string(),
                role,
                source,
            }
        })?;
        warnings.extend(p.warnings.iter().map(|w| format!("{role} `{name}`: {w}")));
        parts.push(ComposedPart {
            name: name.to_string(),
            role,
            blake3: content_hash(&source),
            source,
            init_func: p.init_func.clone(),
        });
        prepared.push((p.preinitialized, names));
    }

    let bytes = plug(&prepared)?;
    Ok(Composed {
        bytes,
        parts,
        warnings,
    })
}

/// The composition itself: instantiate the app, then each middleware from the innermost out
/// with its handler import set to the previous instance's handler export; export the outermost
/// handler. Every other import is left implicit, so wac-graph merges the parts' imports of the
/// same name into one import of the composite.
fn plug(parts: &[(Vec<u8>, Checked)]) -> Result<Vec<u8>, ComposeError> {
    let err = |e: &dyn std::fmt::Display| ComposeError::Compose(format!("{e:#}"));
    let mut graph = CompositionGraph::new();
    let mut packages = Vec::with_capacity(parts.len());
    for (i, (bytes, _)) in parts.iter().enumerate() {
        // Package names only label the parts inside the composite; the position keeps them
        // unique and the output independent of file names.
        let package = Package::from_bytes(
            &format!("edged:part{i}"),
            None,
            bytes.clone(),
            graph.types_mut(),
        )
        .map_err(|e| err(&e))?;
        packages.push(graph.register_package(package).map_err(|e| err(&e))?);
    }
    let (app_package, middlewares) = packages.split_last().expect("a chain has an app");
    let (_, app) = parts.last().expect("a chain has an app");
    let app_instance = graph.instantiate(*app_package);
    let mut next = graph
        .alias_instance_export(app_instance, &app.export)
        .map_err(|e| err(&e))?;
    for (package, (_, names)) in middlewares.iter().zip(parts).rev() {
        let instance = graph.instantiate(*package);
        let import = names
            .import
            .as_deref()
            .expect("checked: a middleware imports a handler");
        graph
            .set_instantiation_argument(instance, import, next)
            .map_err(|e| err(&e))?;
        next = graph
            .alias_instance_export(instance, &names.export)
            .map_err(|e| err(&e))?;
    }
    let export = &parts[0].1.export;
    graph.export(next, export).map_err(|e| err(&e))?;
    graph
        .encode(EncodeOptions::default())
        .map_err(|e| err(&anyhow_chain(&e)))
}

/// An error with its sources, on one line: wac-graph's top-level messages leave the reason to
/// the source.
fn anyhow_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
