//! The manifest: the unit of deployment a node stores, activates and serves.
//!
//! It names every blob a deployment needs by BLAKE3 hash, so the store can check a manifest is
//! complete before indexing it, and a node can check any bytes it is handed against it.

use edged_compiler::{GuestKind, MemoryImageReport, PartRole, Target, WasmKind};
use serde::{Deserialize, Serialize};

/// A blob by content address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRef {
    pub blake3: String,
    pub size: u64,
}

/// A native artifact of a deployment for one target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactRef {
    pub target: Target,
    /// Engine compatibility fingerprint the artifact was compiled for.
    pub fingerprint: String,
    pub blake3: String,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub name: String,
    /// Monotonic per name.
    pub version: u64,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    pub kind: WasmKind,
    /// The operator's `.wasm`, which a node recompiles from when no artifact fits its engine.
    pub source: BlobRef,
    /// The Wizer init function applied before compiling, if any.
    pub init_func: Option<String>,
    pub artifacts: Vec<ArtifactRef>,
    /// Path prefix the deployment serves (default `/<name>`).
    #[serde(default)]
    pub route: Option<String>,
    /// Per-request limits (default: the node's defaults).
    #[serde(default)]
    pub limits: Option<DeploymentLimits>,
    /// Whether every linear memory starts from a copy-on-write image, and its size: what
    /// `edgectl build` and `ls` show about a guest's start-up cost. Absent from manifests built
    /// before it existed (and then not serialized, so their signatures still verify). Boxed:
    /// manifests travel inside wire messages that should stay small.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_image: Option<Box<MemoryImageReport>>,
    /// How a node runs it, as the compiler read it from the exports. Fields added after the
    /// first release are left out of the encoding when unset, so manifests signed before them
    /// keep their canonical bytes (and signatures).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<GuestKind>,
    /// Instance reuse the deployment asks for (default: its guest kind's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instances: Option<InstanceReuse>,
    /// For a middleware chain, its inputs, outermost first and the app last; `source` is then
    /// their composite. Each input is a source blob of the deployment, so a middleware in
    /// front of many apps is one blob in a store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parts: Option<Vec<PartRef>>,
}

/// One input of a middleware chain: a source blob named by content address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartRef {
    /// What the operator called it (the file name).
    pub name: String,
    pub role: PartRole,
    pub blake3: String,
    pub size: u64,
}

/// Instance reuse a deployment asks for; each unset value takes the guest kind's default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceReuse {
    /// Requests one instance serves before it is dropped (1: fresh per request).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<u64>,
    /// Requests one instance serves at once (wasi:http 0.3 only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrent: Option<u64>,
    /// An idle instance is dropped after this many milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_ms: Option<u64>,
}

/// Per-request limits a deployment asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentLimits {
    pub memory_mib: u64,
    pub timeout_ms: u64,
    pub max_concurrency: usize,
    pub max_body_kib: u64,
}

impl Manifest {
    /// `name@version`, the manifest's identity in logs and in the index.
    pub fn id(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }

    /// Every blob hash this manifest depends on.
    pub fn blob_hashes(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.source.blake3.as_str())
            .chain(self.part_refs().iter().map(|p| p.blake3.as_str()))
            .chain(self.artifacts.iter().map(|a| a.blake3.as_str()))
    }

    /// The chain's parts (empty for a single component).
    pub fn part_refs(&self) -> &[PartRef] {
        self.parts.as_deref().unwrap_or_default()
    }

    /// How a node runs it: the compiler's record, or for manifests from before that record,
    /// what the binary kind implies (components were all `wasi:http` 0.2 then).
    pub fn guest_kind(&self) -> GuestKind {
        self.guest.unwrap_or(match self.kind {
            WasmKind::Module => GuestKind::P1Command,
            WasmKind::Component => GuestKind::HttpP2,
        })
    }

    pub fn artifact_for(&self, target: Target, fingerprint: &str) -> Option<&ArtifactRef> {
        self.artifacts
            .iter()
            .find(|a| a.target == target && a.fingerprint == fingerprint)
    }
}

/// A deployment name must be usable in paths, routes and log lines as is.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err(format!("name `{name}` must be 1 to 64 characters"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        return Err(format!(
            "name `{name}` may contain only ASCII letters, digits, `-`, `_` and `.`"
        ));
    }
    Ok(())
}

impl Manifest {
    /// The manifest describing a compiler output.
    pub fn from_compiled(
        name: &str,
        version: u64,
        created_at: u64,
        compiled: &edged_compiler::Compiled,
    ) -> Manifest {
        Manifest {
            name: name.to_string(),
            version,
            created_at,
            kind: compiled.kind,
            source: BlobRef {
                blake3: edged_compiler::content_hash(&compiled.source),
                size: compiled.source.len() as u64,
            },
            init_func: compiled.init_func.clone(),
            artifacts: compiled
                .artifacts
                .iter()
                .map(|a| ArtifactRef {
                    target: a.target,
                    fingerprint: a.fingerprint.clone(),
                    blake3: a.blake3.clone(),
                    size: a.bytes.len() as u64,
                })
                .collect(),
            route: None,
            limits: None,
            // Judged on what the artifacts were compiled from (the Wizer snapshot, if any).
            memory_image: edged_compiler::memory_image::analyze(&compiled.preinitialized)
                .ok()
                .map(Box::new),
            guest: Some(compiled.guest),
            instances: None,
            parts: None,
        }
    }

    /// The manifest describing a compiled middleware chain (see [`edged_compiler::compile_chain`]).
    pub fn from_chain(
        name: &str,
        version: u64,
        created_at: u64,
        compiled: &edged_compiler::Compiled,
        parts: &[edged_compiler::ComposedPart],
    ) -> Manifest {
        Manifest {
            parts: Some(
                parts
                    .iter()
                    .map(|p| PartRef {
                        name: p.name.clone(),
                        role: p.role,
                        blake3: p.blake3.clone(),
                        size: p.source.len() as u64,
                    })
                    .collect(),
            ),
            ..Manifest::from_compiled(name, version, created_at, compiled)
        }
    }
}

#[cfg(any(test, feature = "test-util"))]
impl Manifest {
    /// A well-formed manifest for tests that need one but no real blobs: `name@version`, a core
    /// module with a made-up source and x86_64 artifact, nothing optional set. A test that
    /// stores it sets `source` and `artifacts` to blobs it put.
    pub fn sample(name: &str, version: u64) -> Manifest {
        Manifest {
            name: name.into(),
            version,
            created_at: 0,
            kind: WasmKind::Module,
            source: BlobRef {
                blake3: "aa".repeat(32),
                size: 10,
            },
            init_func: None,
            artifacts: vec![ArtifactRef {
                target: Target::X86_64Linux,
                fingerprint: "sample".into(),
                blake3: "bb".repeat(32),
                size: 20,
            }],
            route: None,
            limits: None,
            memory_image: None,
            guest: None,
            instances: None,
            parts: None,
        }
    }
}
