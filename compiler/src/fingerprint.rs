//! Engine compatibility fingerprints.
//!
//! wasmtime exposes the exact set of settings an artifact must match as a `Hash` value
//! ([`wasmtime::Engine::precompile_compatibility_hash`]). We feed it through BLAKE3 instead of
//! the std `DefaultHasher` so the result is stable across processes and machines, and can be
//! written into signed manifests and compared on another node.

use std::hash::{Hash, Hasher};

use wasmtime::Engine;

struct Blake3Hasher(blake3::Hasher);

impl Hasher for Blake3Hasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    fn finish(&self) -> u64 {
        let digest = self.0.finalize();
        u64::from_le_bytes(digest.as_bytes()[..8].try_into().expect("8 bytes"))
    }
}

/// Hex fingerprint of everything in `engine` that decides whether an artifact is loadable.
pub fn engine_fingerprint(engine: &Engine) -> String {
    let mut hasher = Blake3Hasher(blake3::Hasher::new());
    engine.precompile_compatibility_hash().hash(&mut hasher);
    // 128 bits is plenty to tell configurations apart and keeps manifests readable.
    hex::encode(&hasher.0.finalize().as_bytes()[..16])
}
