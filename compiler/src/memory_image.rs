//! Whether a guest's linear memories start from copy-on-write images, and how large they are.
//!
//! wasmtime maps a memory's initial contents from the compiled artifact (copy-on-write, no bytes
//! copied per instance) only when it can lay that memory out at compile time: every active data
//! segment of the module must target a memory the module itself defines, at a constant offset,
//! inside the memory's initial size, and the image must not be sparse. Otherwise the whole
//! module's segments are copied into memory on every instantiation — a cost that grows with the
//! data, which is what makes a large guest slow to start. Typical causes: a module that imports
//! its memory (dynamically linked components), or offsets placed by an imported global
//! (`__memory_base`).
//!
//! [`analyze`] applies the same rule as wasmtime (`wasmtime-environ`'s `try_static_init`, for
//! the pinned version) to every core module of a module or component, so `edgectl` can tell an
//! operator why a guest is slow to start without loading it.

use serde::{Deserialize, Serialize};

use crate::CompileError;

/// Images up to this size are always used, however sparse: wasmtime's default
/// `memory_guaranteed_dense_image_size`.
const DENSE_IMAGE_ALWAYS_ALLOWED: u64 = 16 << 20;
/// wasmtime lays images out in host pages; 4 KiB on edged's targets' usual kernels, and data
/// offsets are rounded to it only for the reported size.
const IMAGE_PAGE: u64 = 4096;

/// The copy-on-write picture of one module or component (all its core modules together).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryImageReport {
    /// Linear memories the guest defines (imported ones are counted where they are defined).
    pub memories: u32,
    /// Bytes of copy-on-write images, page-rounded: mapped, not copied, per instance.
    pub image_bytes: u64,
    /// Bytes of data segments copied into memory on every instantiation (no image covers them).
    pub copied_bytes: u64,
    /// Core modules whose data segments are copied, and why, e.g.
    /// `module 8: segment 0 is placed by an imported global`.
    pub copied_because: Vec<String>,
}

impl MemoryImageReport {
    /// Every memory starts from an image: no data is copied per instance.
    pub fn all_cow(&self) -> bool {
        self.copied_bytes == 0
    }
}

/// `bytes` for people: `23 B`, `4.0 KiB`, `12.3 MiB`.
pub fn human_bytes(bytes: u64) -> String {
    match bytes {
        b if b < 1 << 10 => format!("{b} B"),
        b if b < 1 << 20 => format!("{:.1} KiB", b as f64 / (1 << 10) as f64),
        b => format!("{:.1} MiB", b as f64 / (1 << 20) as f64),
    }
}

impl std::fmt::Display for MemoryImageReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.all_cow() {
            write!(
                f,
                "yes: {} copy-on-write image ({} memor{})",
                human_bytes(self.image_bytes),
                self.memories,
                if self.memories == 1 { "y" } else { "ies" }
            )
        } else {
            write!(
                f,
                "NO: {} of data copied into memory per instance ({}); {} copy-on-write",
                human_bytes(self.copied_bytes),
                self.copied_because.join("; "),
                human_bytes(self.image_bytes)
            )
        }
    }
}

/// One core module's memories and active data segments.
#[derive(Default)]
struct ModuleScan {
    index: usize,
    imported_memories: u32,
    /// Initial size in bytes of each defined memory, `None` if it overflows.
    defined: Vec<Option<u64>>,
    /// (memory index, constant offset if it is one, length)
    segments: Vec<(u32, Option<u64>, u64)>,
}

impl ModuleScan {
    /// Adds this module to `report`, by wasmtime's rule: all of its segments become images, or
    /// none do.
    fn finish(self, report: &mut MemoryImageReport) {
        report.memories += self.defined.len() as u32;
        let total: u64 = self.segments.iter().map(|s| s.2).sum();
        match self.static_layout() {
            Ok(images) => report.image_bytes += images,
            Err(reason) => {
                // Empty segments copy nothing; a module with only those costs nothing.
                if total > 0 {
                    report.copied_bytes += total;
                    report
                        .copied_because
                        .push(format!("module {}: {reason}", self.index));
                }
            }
        }
    }

    /// Image bytes per instance if every segment can be laid out at compile time, else why not.
    fn static_layout(&self) -> Result<u64, String> {
        // (min, max, data bytes) per defined memory
        let mut extents = vec![(u64::MAX, 0u64, 0u64); self.defined.len()];
        for (i, &(memory, offset, len)) in self.segments.iter().enumerate() {
            let Some(defined) = memory.checked_sub(self.imported_memories) else {
                return Err(format!("segment {i} writes into an imported memory"));
            };
            let Some(offset) = offset else {
                return Err(format!(
                    "segment {i} is placed by a global or an expression, not a constant"
                ));
            };
            let end = offset.checked_add(len).ok_or("segment offset overflows")?;
            match self.defined.get(defined as usize).copied().flatten() {
                Some(initial) if end <= initial => {}
                _ => return Err(format!("segment {i} ends past the memory's initial size")),
            }
            if len == 0 {
                continue;
            }
            let e = &mut extents[defined as usize];
            *e = (e.0.min(offset), e.1.max(end), e.2 + len);
        }
        let mut bytes = 0;
        for (memory, &(min, max, data)) in extents.iter().enumerate() {
            if data == 0 {
                continue;
            }
            let span = max - min;
            if span >= data.saturating_mul(2) && span >= DENSE_IMAGE_ALWAYS_ALLOWED {
                return Err(format!(
                    "memory {memory}'s data is too sparse for an image ({data} bytes over {span})"
                ));
            }
            bytes += max.div_ceil(IMAGE_PAGE) * IMAGE_PAGE - min / IMAGE_PAGE * IMAGE_PAGE;
        }
        Ok(bytes)
    }
}

/// A constant offset expression's value: exactly one `i32.const` or `i64.const`, as wasmtime
/// requires (anything else, such as `global.get $__memory_base`, is evaluated per instance).
fn const_offset(expr: &wasmparser::ConstExpr<'_>) -> Option<u64> {
    let mut ops = expr.get_operators_reader();
    let value = match ops.read().ok()? {
        wasmparser::Operator::I32Const { value } => u64::from(value as u32),
        wasmparser::Operator::I64Const { value } => value as u64,
        _ => return None,
    };
    matches!(ops.read().ok()?, wasmparser::Operator::End).then_some(value)
}

/// The copy-on-write picture of `wasm` (a core module or a component, binary): every core
/// module, at any nesting depth, is judged as wasmtime will when compiling it.
pub fn analyze(wasm: &[u8]) -> Result<MemoryImageReport, CompileError> {
    let invalid = |e: wasmparser::BinaryReaderError| CompileError::NotWasm(e.to_string());
    let mut report = MemoryImageReport::default();
    // One entry per open module (`Some`) or component (`None`), innermost last.
    let mut open: Vec<Option<ModuleScan>> = Vec::new();
    let mut modules = 0;
    for payload in wasmparser::Parser::new(0).parse_all(wasm) {
        use wasmparser::Payload;
        match payload.map_err(invalid)? {
            Payload::Version { encoding, .. } => match encoding {
                wasmparser::Encoding::Module => {
                    open.push(Some(ModuleScan {
                        index: modules,
                        ..ModuleScan::default()
                    }));
                    modules += 1;
                }
                wasmparser::Encoding::Component => open.push(None),
            },
            Payload::End(_) => {
                if let Some(Some(scan)) = open.pop() {
                    scan.finish(&mut report);
                }
            }
            Payload::ImportSection(imports) => {
                if let Some(Some(scan)) = open.last_mut() {
                    for import in imports.into_imports() {
                        if let wasmparser::TypeRef::Memory(_) = import.map_err(invalid)?.ty {
                            scan.imported_memories += 1;
                        }
                    }
                }
            }
            Payload::MemorySection(memories) => {
                if let Some(Some(scan)) = open.last_mut() {
                    for memory in memories {
                        let memory = memory.map_err(invalid)?;
                        let page = 1u64 << memory.page_size_log2.unwrap_or(16);
                        scan.defined.push(memory.initial.checked_mul(page));
                    }
                }
            }
            Payload::DataSection(data) => {
                if let Some(Some(scan)) = open.last_mut() {
                    for segment in data {
                        let segment = segment.map_err(invalid)?;
                        if let wasmparser::DataKind::Active {
                            memory_index,
                            offset_expr,
                        } = segment.kind
                        {
                            scan.segments.push((
                                memory_index,
                                const_offset(&offset_expr),
                                segment.data.len() as u64,
                            ));
                        }
                    }
                }
            }
            _ => {}
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(wat: &str) -> MemoryImageReport {
        analyze(&wat::parse_str(wat).expect("test WAT parses")).expect("analyzes")
    }

    #[test]
    fn constant_offsets_get_an_image() {
        let r = report(
            r#"(module (memory 2) (data (i32.const 16) "hello") (data (i32.const 70000) "x"))"#,
        );
        assert!(r.all_cow(), "{r}");
        assert_eq!(r.memories, 1);
        // Pages 0 through 17 (70001 bytes rounded up to 4 KiB pages).
        assert_eq!(r.image_bytes, 18 * 4096);
    }

    #[test]
    fn an_imported_global_offset_is_copied() {
        let r = report(
            r#"(module (import "env" "base" (global $b i32)) (memory 1)
                 (data (i32.const 0) "abc") (data (global.get $b) "hello"))"#,
        );
        assert!(!r.all_cow());
        // wasmtime gives up on the whole module: both segments are copied.
        assert_eq!(r.copied_bytes, 8);
        assert_eq!(r.image_bytes, 0);
        assert!(r.copied_because[0].contains("segment 1"), "{r}");
    }

    #[test]
    fn segments_into_an_imported_memory_are_copied() {
        let r = report(
            r#"(component
                 (core module $m (memory (export "memory") 1))
                 (core module $lib (import "env" "memory" (memory 1)) (data (i32.const 8) "lib"))
                 (core instance $i (instantiate $m))
                 (core instance (instantiate $lib (with "env" (instance $i)))))"#,
        );
        assert_eq!((r.memories, r.copied_bytes), (1, 3));
        assert!(r.copied_because[0].starts_with("module 1:"), "{r}");
    }

    #[test]
    fn no_data_needs_no_image() {
        let r = report("(module (memory 1))");
        assert!(r.all_cow());
        assert_eq!((r.memories, r.image_bytes), (1, 0));
    }

    #[test]
    fn sparse_large_images_are_refused() {
        // 1 byte at 0 and 1 byte at 32 MiB: a 32 MiB image for 2 bytes.
        let r = report(
            r#"(module (memory 1024) (data (i32.const 0) "a") (data (i32.const 33554432) "b"))"#,
        );
        assert!(!r.all_cow());
        assert!(r.copied_because[0].contains("sparse"), "{r}");
    }
}
