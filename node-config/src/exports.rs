//! Whether a `.wasm` exports the function a config's `init = "<name>"` names: checked by
//! `edged check-config` so a missing init export is found before start tries to compile.
//!
//! The walk is the compiler's (`compiler/src/preinit.rs`): only the top level counts, so an
//! export of a module nested inside a component does not.

/// Does the Wasm binary `wasm` (a core module or a component, not WAT) export a function named
/// `name` at its top level? An unparsable binary exports nothing.
pub fn exports_func(wasm: &[u8], name: &str) -> bool {
    let component = wasmparser::Parser::is_component(wasm);
    let mut depth = 0usize;
    for payload in wasmparser::Parser::new(0).parse_all(wasm) {
        let Ok(payload) = payload else { return false };
        let found = match payload {
            wasmparser::Payload::ModuleSection { .. }
            | wasmparser::Payload::ComponentSection { .. } => {
                depth += 1;
                false
            }
            wasmparser::Payload::End(_) => {
                depth = depth.saturating_sub(1);
                false
            }
            wasmparser::Payload::ExportSection(exports) if !component && depth == 0 => exports
                .into_iter()
                .flatten()
                .any(|e| e.name == name && e.kind == wasmparser::ExternalKind::Func),
            wasmparser::Payload::ComponentExportSection(exports) if component && depth == 0 => {
                exports.into_iter().flatten().any(|e| {
                    e.name.name == name && e.kind == wasmparser::ComponentExternalKind::Func
                })
            }
            _ => false,
        };
        if found {
            return true;
        }
    }
    false
}
