//! The operator's side of OCI registries: `publish` (compile, sign, store the deployment in a
//! registry under one tag), `deploy` (tell a node to pull a published deployment; only the
//! signed manifest crosses the operator's link), and reading a component someone else published
//! (`push oci://…`). The layout is `edged_control::registry`'s.

use std::path::PathBuf;

use anyhow::{Context, Result, anyhow, bail};
use edged_artifacts::Manifest;
use edged_control::registry::{
    Access, ArtifactLayer, Credentials, RegistryClient, display_reference, parse_reference,
};
use edged_control::signing::{SignedManifest, signing_key_from_hex};
use edged_control::wire::{Request, Response};

use crate::build::{Built, CacheArgs, CompileArgs, compile_cached, now_secs, print_steps};
use crate::remote::{Client, Target, identity_dir};

/// How to reach a registry (for `publish`, `deploy` and `push oci://…`).
#[derive(clap::Args, Clone, Debug)]
pub struct RegistryArgs {
    /// Talk plain HTTP to the registry (no TLS): a registry on loopback or a trusted LAN.
    #[arg(long, global = true)]
    pub plain_http: bool,
    /// PEM CA certificates to trust for the registry's TLS besides the system roots.
    #[arg(long, env = "EDGECTL_REGISTRY_CA", global = true, value_name = "FILE")]
    pub registry_ca: Option<PathBuf>,
    /// A file with one line USERNAME:PASSWORD for the registry (never printed).
    #[arg(
        long,
        env = "EDGECTL_REGISTRY_CREDENTIALS",
        global = true,
        value_name = "FILE"
    )]
    pub registry_credentials: Option<PathBuf>,
}

impl RegistryArgs {
    pub fn client(&self) -> Result<RegistryClient> {
        let credentials = self
            .registry_credentials
            .as_deref()
            .map(Credentials::load)
            .transpose()?;
        Ok(RegistryClient::new(&Access {
            plain_http: self.plain_http,
            ca_file: self.registry_ca.clone(),
            credentials,
            read_timeout: None,
        })?)
    }
}

#[derive(clap::Args)]
pub struct PublishArgs {
    /// The .wasm (or .wat) to publish.
    pub input: PathBuf,
    /// Where: oci://REGISTRY/REPOSITORY:TAG.
    pub reference: String,
    /// Deployment name (default: the input's file stem).
    #[arg(long)]
    pub name: Option<String>,
    /// Version (default: one more than the newest published under this tag, else 1).
    #[arg(long)]
    pub version: Option<u64>,
    /// Route prefix (default: /<name>).
    #[arg(long)]
    pub route: Option<String>,
    #[command(flatten)]
    pub compile: CompileArgs,
}

#[derive(clap::Args)]
pub struct DeployArgs {
    /// The published deployment: oci://REGISTRY/REPOSITORY:TAG.
    pub reference: String,
    /// Store without activating.
    #[arg(long)]
    pub no_activate: bool,
}

/// Whether a push input names a registry rather than a file.
pub fn is_reference(input: &std::path::Path) -> bool {
    input
        .to_str()
        .is_some_and(|s| s.starts_with(edged_control::registry::SCHEME))
}

/// The Wasm a registry holds at `reference` (CNCF Wasm layout, e.g. from `wkg oci push`).
pub async fn pull_source(registry: &RegistryArgs, reference: &str) -> Result<Vec<u8>> {
    let parsed = parse_reference(reference)?;
    let (bytes, digest) = registry
        .client()?
        .pull_wasm(&parsed)
        .await
        .with_context(|| format!("pulling {reference}"))?;
    eprintln!("pulled {reference} ({digest}, {} bytes)", bytes.len());
    Ok(bytes)
}

/// The default deployment name for a registry input: the repository's last segment.
pub fn name_from_reference(reference: &str) -> Result<String> {
    let parsed = parse_reference(reference)?;
    let last = parsed.repository().rsplit('/').next().unwrap_or_default();
    edged_artifacts::manifest::validate_name(last).map_err(|e| anyhow!("{e}; pass --name"))?;
    Ok(last.to_string())
}

fn signing_key(target: &Target) -> Result<ed25519_dalek::SigningKey> {
    let key_path = identity_dir(target.identity.as_deref()).join("signing.key");
    signing_key_from_hex(
        &std::fs::read_to_string(&key_path)
            .with_context(|| format!("reading {}", key_path.display()))?,
    )
    .map_err(|e| anyhow!("{}: {e}", key_path.display()))
}

pub async fn publish(
    target: &Target,
    cache: &CacheArgs,
    registry: &RegistryArgs,
    args: PublishArgs,
) -> Result<()> {
    let reference = parse_reference(&args.reference)?;
    if reference.digest().is_some() {
        bail!("publish to a tag (oci://REGISTRY/REPO:TAG), not a digest");
    }
    let name = crate::build::deployment_name(&args.input, args.name.as_deref())?;
    let key = signing_key(target)?;
    let bytes =
        std::fs::read(&args.input).with_context(|| format!("reading {}", args.input.display()))?;
    let Built { compiled, steps } =
        compile_cached(&bytes, &args.compile.options()?, cache.open().as_ref())
            .with_context(|| format!("building {}", args.input.display()))?;
    if !target.json {
        println!(
            "built {name} ({}, {} targets)",
            compiled.kind,
            compiled.artifacts.len()
        );
        print_steps(&steps);
    }
    let client = registry.client()?;
    let version = match args.version {
        Some(v) => v,
        // A tag that holds no edged deployment yet (or is new) starts at 1.
        None => match client.resolve(&reference).await {
            Ok(published) if published.signed.payload.name == name => {
                published.signed.payload.version + 1
            }
            _ => 1,
        },
    };
    let mut manifest = Manifest::from_compiled(&name, version, now_secs(), &compiled);
    manifest.route = args.route.clone();
    let signed = SignedManifest::sign(manifest, &key);
    let artifacts: Vec<ArtifactLayer> = compiled
        .artifacts
        .iter()
        .map(|a| ArtifactLayer {
            target: a.target.to_string(),
            blake3: a.blake3.clone(),
            bytes: a.bytes.clone(),
        })
        .collect();
    let published = client
        .publish(&reference, &compiled.source, &signed, &artifacts)
        .await
        .with_context(|| format!("publishing to {}", args.reference))?;
    let id = signed.payload.id();
    if target.json {
        println!(
            "{}",
            serde_json::json!({
                "deployment": id, "reference": args.reference,
                "wasm_digest": published.wasm_digest,
                "pinned": display_reference(&published.deployment),
                "steps": steps,
            })
        );
    } else {
        println!(
            "published {id} to {} (Wasm artifact {}; deployment {})",
            args.reference,
            published.wasm_digest,
            display_reference(&published.deployment)
        );
    }
    Ok(())
}

pub async fn deploy(target: &Target, registry: &RegistryArgs, args: DeployArgs) -> Result<()> {
    let reference = parse_reference(&args.reference)?;
    let published = registry
        .client()?
        .resolve(&reference)
        .await
        .with_context(|| format!("resolving {}", args.reference))?;
    let id = published.signed.payload.id();
    let pinned = display_reference(&published.deployment);
    let node = Client::connect(target).await?;
    let answer = node
        .call(&Request::Deploy {
            manifest: Box::new(published.signed),
            reference: pinned.clone(),
            activate: !args.no_activate,
        })
        .await?;
    let active = match answer {
        Response::Committed { active, .. } => active,
        other => bail!("unexpected answer to deploy: {other:?}"),
    };
    if target.json {
        println!(
            "{}",
            serde_json::json!({"deployment": id, "reference": pinned, "active": active})
        );
    } else {
        println!(
            "deployed {id}{} on {} from {pinned}",
            if active { " (active)" } else { "" },
            target.node
        );
    }
    Ok(())
}

/// `push`'s input: a file's bytes, or a component pulled from a registry.
pub async fn push_input(
    input: &std::path::Path,
    compile: &CompileArgs,
    cache: &CacheArgs,
    registry: &RegistryArgs,
) -> Result<Built> {
    let bytes = if is_reference(input) {
        pull_source(registry, &input.to_string_lossy()).await?
    } else {
        std::fs::read(input).with_context(|| format!("reading {}", input.display()))?
    };
    compile_cached(&bytes, &compile.options()?, cache.open().as_ref())
        .with_context(|| format!("building {}", input.display()))
}
