//! What a guest is to the node: which of the three ways edged runs Wasm it is built for.
//!
//! Read from the binary's top-level exports, before anything is compiled, so a component that
//! serves neither `wasi:http` version is refused at build time with a reason instead of failing
//! on a node. The node does not trust this record for linking (it checks the component against
//! its own bindings when it prepares it); it is what `edgectl` and `ls` show, and the default
//! instance policy follows it.

use serde::{Deserialize, Serialize};

use crate::{CompileError, WasmKind};

/// How a node runs a guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum GuestKind {
    /// A WASI preview 1 command module, run CGI-style (`_start` once per request).
    #[serde(rename = "p1-command")]
    P1Command,
    /// A `wasi:http@0.2` component exporting `wasi:http/incoming-handler` (the `proxy` world).
    #[serde(rename = "wasi-http-0.2")]
    HttpP2,
    /// A `wasi:http@0.3` component exporting `wasi:http/handler` (the `service` or `middleware`
    /// world): async, may be reused and called concurrently.
    #[serde(rename = "wasi-http-0.3")]
    HttpP3,
}

impl std::fmt::Display for GuestKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GuestKind::P1Command => "p1 command",
            GuestKind::HttpP2 => "wasi:http 0.2",
            GuestKind::HttpP3 => "wasi:http 0.3",
        })
    }
}

/// The export a `wasi:http@0.3` service or middleware has (any 0.3.x patch version).
const HANDLER_P3: &str = "wasi:http/handler@0.3.";
/// The export a `wasi:http@0.2` proxy has (any 0.2.x patch version).
const INCOMING_HANDLER_P2: &str = "wasi:http/incoming-handler@0.2.";

/// The guest kind of `bytes`, a binary of `kind` (already validated). A component must export
/// one of the two `wasi:http` handlers; a 0.3 handler wins if (oddly) both are present.
pub fn guest_kind(kind: WasmKind, bytes: &[u8]) -> Result<GuestKind, CompileError> {
    if kind == WasmKind::Module {
        return Ok(GuestKind::P1Command);
    }
    let exports = component_exports(bytes);
    if exports.iter().any(|e| e.starts_with(HANDLER_P3)) {
        Ok(GuestKind::HttpP3)
    } else if exports.iter().any(|e| e.starts_with(INCOMING_HANDLER_P2)) {
        Ok(GuestKind::HttpP2)
    } else {
        let shown = if exports.is_empty() {
            "nothing".to_string()
        } else {
            exports.join(", ")
        };
        Err(CompileError::Invalid {
            kind,
            reason: format!(
                "a component must export `wasi:http/handler@0.3.x` (a wasi:http 0.3 service) or \
                 `wasi:http/incoming-handler@0.2.x` (a wasi:http 0.2 proxy); it exports {shown}"
            ),
        })
    }
}

/// Names of a component's top-level exports (nested components and modules are skipped).
pub fn component_exports(bytes: &[u8]) -> Vec<String> {
    let mut depth = 0usize;
    let mut names = Vec::new();
    for payload in wasmparser::Parser::new(0).parse_all(bytes) {
        let Ok(payload) = payload else { break };
        match payload {
            wasmparser::Payload::ModuleSection { .. }
            | wasmparser::Payload::ComponentSection { .. } => depth += 1,
            wasmparser::Payload::End(_) => depth = depth.saturating_sub(1),
            wasmparser::Payload::ComponentExportSection(exports) if depth == 0 => {
                names.extend(
                    exports
                        .into_iter()
                        .flatten()
                        .map(|e| e.name.name.to_string()),
                );
            }
            _ => {}
        }
    }
    names
}

/// Names of a component's top-level imports.
pub fn component_imports(bytes: &[u8]) -> Vec<String> {
    let mut depth = 0usize;
    let mut names = Vec::new();
    for payload in wasmparser::Parser::new(0).parse_all(bytes) {
        let Ok(payload) = payload else { break };
        match payload {
            wasmparser::Payload::ModuleSection { .. }
            | wasmparser::Payload::ComponentSection { .. } => depth += 1,
            wasmparser::Payload::End(_) => depth = depth.saturating_sub(1),
            wasmparser::Payload::ComponentImportSection(imports) if depth == 0 => {
                names.extend(
                    imports
                        .into_iter()
                        .flatten()
                        .map(|i| i.name.name.to_string()),
                );
            }
            _ => {}
        }
    }
    names
}
