//! Compilation targets, their CPU-feature baselines, and the one engine configuration that
//! both the compiler and the node runtime derive from.
//!
//! An artifact only loads into an engine whose code-affecting settings match the ones it was
//! compiled with, so everything that changes generated code lives in [`base_config`] and nowhere
//! else. The runtime layers allocation strategy on top of it (that does not change code).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use wasmtime::{Config, OptLevel};

use crate::CompileError;

/// A native target edged ships artifacts for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Target {
    #[serde(rename = "x86_64-unknown-linux-gnu")]
    X86_64Linux,
    #[serde(rename = "aarch64-unknown-linux-gnu")]
    Aarch64Linux,
}

/// CPU features Cranelift may assume on x86_64: the x86-64-v2 level (Nehalem, 2008, and every
/// Atom since Silvermont). AVX/AVX2/BMI are left off on purpose: many edge boxes (Atom, Celeron
/// J/N series before Tremont, older Pentium Silver) lack them, and an artifact that uses an
/// instruction the CPU lacks is refused at load time rather than crashing, but then the node has
/// to recompile. Every flag is set explicitly so the build machine's CPU never leaks in.
const X86_64_BASELINE: &[(&str, bool)] = &[
    ("has_sse3", true),
    ("has_ssse3", true),
    ("has_cmpxchg16b", true),
    ("has_sse41", true),
    ("has_sse42", true),
    ("has_popcnt", true),
    ("has_avx", false),
    ("has_avx2", false),
    ("has_fma", false),
    ("has_bmi1", false),
    ("has_bmi2", false),
    ("has_lzcnt", false),
    ("has_avx512f", false),
    ("has_avx512vl", false),
    ("has_avx512dq", false),
    ("has_avx512bitalg", false),
    ("has_avx512vbmi", false),
    ("has_avx512vnni", false),
    ("has_avx_vnni", false),
];

/// CPU features Cranelift may assume on aarch64: plain ARMv8.0-A. LSE atomics (ARMv8.1) are off
/// because the most common small boards (Raspberry Pi 3/4: Cortex-A53/A72) do not have them;
/// atomics then compile to LL/SC loops, which every ARMv8 core runs. Pointer authentication and
/// BTI are off for the same reason. No FP16, dot-product or i8mm either.
const AARCH64_BASELINE: &[(&str, bool)] = &[
    ("has_lse", false),
    ("has_pauth", false),
    ("has_fp16", false),
    ("has_dotprod", false),
    ("has_i8mm", false),
    ("sign_return_address", false),
    ("sign_return_address_all", false),
    ("sign_return_address_with_bkey", false),
    ("use_bti", false),
];

impl Target {
    pub const ALL: [Target; 2] = [Target::X86_64Linux, Target::Aarch64Linux];

    pub fn triple(self) -> &'static str {
        match self {
            Target::X86_64Linux => "x86_64-unknown-linux-gnu",
            Target::Aarch64Linux => "aarch64-unknown-linux-gnu",
        }
    }

    /// The target this process runs on, if edged supports it.
    pub fn host() -> Option<Target> {
        if cfg!(all(target_arch = "x86_64", target_os = "linux")) {
            Some(Target::X86_64Linux)
        } else if cfg!(all(target_arch = "aarch64", target_os = "linux")) {
            Some(Target::Aarch64Linux)
        } else {
            None
        }
    }

    /// The Cranelift ISA flags this target's artifacts are compiled with.
    pub fn cpu_baseline(self) -> &'static [(&'static str, bool)] {
        match self {
            Target::X86_64Linux => X86_64_BASELINE,
            Target::Aarch64Linux => AARCH64_BASELINE,
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.triple())
    }
}

impl FromStr for Target {
    type Err = CompileError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Target::ALL
            .into_iter()
            .find(|t| t.triple() == s || t.triple().split('-').next() == Some(s))
            .ok_or_else(|| CompileError::UnsupportedTarget(s.to_string()))
    }
}

/// Engine settings that change generated code, and therefore the fingerprint. Nodes with small
/// address spaces (qemu-user, 32-bit-ish VMs) lower `memory_reservation`; their artifacts then
/// differ from the fleet default and are compiled locally.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineSettings {
    /// Virtual address space reserved per linear memory, in bytes. With the default 4 GiB plus
    /// guard, bounds checks are elided entirely.
    pub memory_reservation: u64,
    /// Guard region after each linear memory, in bytes.
    pub memory_guard_size: u64,
}

impl Default for EngineSettings {
    fn default() -> Self {
        EngineSettings {
            memory_reservation: 4 << 30,
            memory_guard_size: 32 << 20,
        }
    }
}

/// The wasmtime configuration for `target`, with every code-affecting option pinned. The
/// compiler uses it as is; the runtime adds its allocator on top.
pub fn base_config(target: Target, settings: &EngineSettings) -> Result<Config, CompileError> {
    let mut config = Config::new();
    config
        .target(target.triple())
        .map_err(|e| CompileError::UnsupportedTarget(format!("{}: {e}", target.triple())))?;
    // Epoch interruption is how the daemon enforces wall-clock deadlines; it is compiled into
    // every loop header and function prologue, so it has to be on at compile time.
    config.epoch_interruption(true);
    config.wasm_component_model(true);
    // WASI 0.3 (`wasi:http@0.3.0` services and middleware) needs the component model's async
    // ABI: async lifts and lowers, streams and futures, and the task built-ins.
    config.wasm_component_model_async(true);
    config.cranelift_opt_level(OptLevel::Speed);
    config.memory_reservation(settings.memory_reservation);
    config.memory_guard_size(settings.memory_guard_size);
    // Guests may not grow memory in place past the reservation; keeping memory fixed in place is
    // what lets the pooling allocator reuse slots and copy-on-write images.
    config.memory_may_move(false);
    config.memory_init_cow(true);
    config.parallel_compilation(true);
    for (flag, value) in target.cpu_baseline() {
        // SAFETY: these are Cranelift ISA flags for `target`; wasmtime validates them against
        // the host when an artifact is loaded, so a wrong flag is a refused load, not UB.
        unsafe {
            config.cranelift_flag_set(flag, if *value { "true" } else { "false" });
        }
    }
    Ok(config)
}
