//! OCI registries as an origin of signed deployments: how a published deployment is laid out in
//! a registry, and the client both ends use (edgectl publishes and resolves, nodes pull blobs).
//! All registry traffic goes through `oci-client`.
//!
//! One tag, `REPO:TAG`, carries everything a node needs:
//!
//! - the tag itself is the **CNCF Wasm OCI artifact**: config `application/vnd.wasm.config.v0+json`
//!   and exactly one `application/wasm` layer, the source component or module — what
//!   `wkg oci pull` reads (that client refuses a manifest with more layers, so edged's own parts
//!   cannot go there);
//! - a **referrer** of that manifest (its `subject`), of artifact type [`DEPLOYMENT_ARTIFACT`]: its
//!   config blob is the signed manifest (JSON), its layers the source (the same blob) and one
//!   `.cwasm` per target, each annotated with its BLAKE3 name ([`BLAKE3_ANNOTATION`]).
//!   Registries without the referrers API (the CNCF distribution registry 2.x) find it through
//!   the referrers tag schema (`sha256-<hex>` tag holding an index), which [`RegistryClient::publish`]
//!   writes as well.
//!
//! The registry is untrusted storage: nothing read from it is believed except through the
//! signed manifest (signature checked by whoever admits it) and the BLAKE3 names in it, which
//! every downloaded blob must hash to before it is stored.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::Duration;

use futures_util::StreamExt;
use oci_client::client::{
    BlobResponse, Certificate, CertificateEncoding, ClientConfig, ClientProtocol,
};
use oci_client::manifest::{
    OCI_IMAGE_INDEX_MEDIA_TYPE, OCI_IMAGE_MEDIA_TYPE, OciDescriptor, OciImageIndex,
    OciImageManifest, OciManifest,
};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::signing::SignedManifest;

/// The URL scheme of a registry reference on the command line and on the wire.
pub const SCHEME: &str = "oci://";
/// The Wasm artifact's config media type (CNCF Wasm OCI artifact layout).
pub const WASM_CONFIG_MEDIA_TYPE: &str = "application/vnd.wasm.config.v0+json";
/// The Wasm artifact's one layer.
pub const WASM_LAYER_MEDIA_TYPE: &str = "application/wasm";
/// The artifact type of edged's deployment referrer.
pub const DEPLOYMENT_ARTIFACT: &str = "application/vnd.edged.deployment.v1";
/// The deployment referrer's config: the signed manifest, JSON.
pub const SIGNED_MANIFEST_MEDIA_TYPE: &str = "application/vnd.edged.signed-manifest.v1+json";
/// A per-target AOT artifact layer.
pub const CWASM_MEDIA_TYPE: &str = "application/vnd.edged.cwasm.v1";
/// Annotation on every deployment layer: the blob's BLAKE3 name in the signed manifest.
pub const BLAKE3_ANNOTATION: &str = "dev.edged.blake3";
/// Annotation on artifact layers: the target triple.
pub const TARGET_ANNOTATION: &str = "dev.edged.target";
/// Annotation on the referrer (and its index entry): `name@version`.
pub const DEPLOYMENT_ANNOTATION: &str = "dev.edged.deployment";

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("`{0}` is not a registry reference: expected oci://REGISTRY/REPOSITORY:TAG")]
    NotOci(String),
    #[error("registry reference `{reference}`: {reason}")]
    BadReference { reference: String, reason: String },
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("registry {registry}: {source}")]
    Registry {
        registry: String,
        #[source]
        source: oci_client::errors::OciDistributionError,
    },
    #[error("{reference}: {reason}")]
    Layout { reference: String, reason: String },
    #[error("reading blob {digest} from {registry}: {reason}")]
    Stream {
        registry: String,
        digest: String,
        reason: String,
    },
}

impl RegistryError {
    /// The registry could not be reached or failed mid-transfer (worth retrying later), as
    /// opposed to content that is wrong.
    pub fn is_unavailable(&self) -> bool {
        match self {
            RegistryError::Stream { .. } => true,
            RegistryError::Registry { source, .. } => {
                use oci_client::errors::OciDistributionError as E;
                match source {
                    E::RequestError(_) | E::IoError(_) => true,
                    E::ServerError { code, .. } => *code >= 500,
                    _ => false,
                }
            }
            _ => false,
        }
    }
}

/// Parses `oci://REGISTRY/REPO:TAG` (or `@sha256:…`).
pub fn parse_reference(text: &str) -> Result<Reference, RegistryError> {
    let rest = text
        .strip_prefix(SCHEME)
        .ok_or_else(|| RegistryError::NotOci(text.to_string()))?;
    if !rest
        .split('/')
        .next()
        .is_some_and(|host| host.contains(['.', ':']) || host == "localhost")
    {
        return Err(RegistryError::BadReference {
            reference: text.into(),
            reason: "name the registry host first (oci://HOST[:PORT]/REPO:TAG)".into(),
        });
    }
    rest.parse::<Reference>()
        .map_err(|e| RegistryError::BadReference {
            reference: text.into(),
            reason: e.to_string(),
        })
}

/// `reference` written back as `oci://…`.
pub fn display_reference(reference: &Reference) -> String {
    format!("{SCHEME}{}", reference.whole())
}

/// A registry login. Never printed: `Debug` shows only the user name.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credentials({}, password redacted)", self.username)
    }
}

impl Credentials {
    /// Reads a credentials file: one line `USERNAME:PASSWORD` (the password may contain `:`).
    pub fn load(path: &Path) -> Result<Credentials, RegistryError> {
        let bad = |reason: String| RegistryError::File {
            path: path.to_path_buf(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(format!("cannot read: {e}")))?;
        let line = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
        let (username, password) = line
            .trim_end()
            .split_once(':')
            .ok_or_else(|| bad("expected one line USERNAME:PASSWORD".into()))?;
        if username.is_empty() {
            return Err(bad("the user name before `:` is empty".into()));
        }
        Ok(Credentials {
            username: username.into(),
            password: password.into(),
        })
    }
}

/// How to reach a registry: plain HTTP or TLS (with an extra CA for a private registry), and
/// an optional login.
#[derive(Debug, Clone, Default)]
pub struct Access {
    pub plain_http: bool,
    /// PEM certificates trusted besides the system roots.
    pub ca_file: Option<PathBuf>,
    pub credentials: Option<Credentials>,
    /// Longest silence while reading an answer: a stalled registry fails the transfer (it is
    /// resumed later) rather than hanging it.
    pub read_timeout: Option<Duration>,
}

/// What a tag resolves to: the Wasm artifact and edged's newest deployment referrer of it.
#[derive(Debug, Clone)]
pub struct Published {
    /// The Wasm artifact's manifest digest.
    pub wasm_digest: String,
    /// The deployment referrer, pinned by digest: what nodes are told to pull.
    pub deployment: Reference,
    pub signed: SignedManifest,
}

/// A deployment referrer as a node reads it: the layers by BLAKE3 name.
#[derive(Debug, Clone)]
pub struct DeploymentLayers {
    pub signed: SignedManifest,
    pub blobs: BTreeMap<String, OciDescriptor>,
}

/// A blob to publish besides the source: a per-target artifact.
pub struct ArtifactLayer {
    pub target: String,
    pub blake3: String,
    pub bytes: Vec<u8>,
}

/// The CNCF Wasm artifact's config (as `wkg` and `oci-wasm` write it).
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WasmConfig {
    pub created: String,
    #[serde(default)]
    pub author: Option<String>,
    pub architecture: String,
    pub os: String,
    #[serde(default)]
    pub layer_digests: Vec<String>,
    #[serde(default)]
    pub component: Option<ComponentInfo>,
}

/// The component's world, for indexing (`component` in the Wasm config).
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ComponentInfo {
    pub exports: Vec<String>,
    pub imports: Vec<String>,
    #[serde(default)]
    pub target: Option<String>,
}

impl WasmConfig {
    /// The config for `wasm` as the CNCF layout describes it: `os` is `wasip2` for a component
    /// (with its world's imports and exports) and `wasip1` for a core module.
    pub fn describe(wasm: &[u8], author: Option<String>) -> WasmConfig {
        let is_component = wasmparser::Parser::is_component(wasm);
        let component = match wit_component::decode(wasm) {
            Ok(_) if !is_component => None,
            Ok(wit_component::DecodedWasm::Component(resolve, world)) => {
                let world = &resolve.worlds[world];
                Some(ComponentInfo {
                    exports: world
                        .exports
                        .keys()
                        .map(|k| resolve.name_world_key(k))
                        .collect(),
                    imports: world
                        .imports
                        .keys()
                        .map(|k| resolve.name_world_key(k))
                        .collect(),
                    target: None,
                })
            }
            _ => None,
        };
        WasmConfig {
            created: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            author,
            architecture: "wasm".into(),
            os: if component.is_some() {
                "wasip2"
            } else {
                "wasip1"
            }
            .into(),
            layer_digests: vec![sha256_digest(wasm)],
            component,
        }
    }
}

/// `sha256:<hex>` of `bytes`, the OCI digest.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

/// rustls needs one process-wide provider for reqwest; the fleet uses ring everywhere.
fn install_ring() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

pub struct RegistryClient {
    client: Client,
    auth: RegistryAuth,
}

impl fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RegistryClient")
    }
}

/// Reads a PEM file of CA certificates; refuses one that holds none or does not parse.
pub fn load_ca(path: &Path) -> Result<Vec<u8>, RegistryError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let bad = |reason: String| RegistryError::File {
        path: path.to_path_buf(),
        reason,
    };
    let data = std::fs::read(path).map_err(|e| bad(format!("cannot read the registry CA: {e}")))?;
    let certs = CertificateDer::pem_slice_iter(&data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(bad("holds no PEM certificate".into()));
    }
    Ok(data)
}

impl RegistryClient {
    pub fn new(access: &Access) -> Result<RegistryClient, RegistryError> {
        install_ring();
        let mut extra_root_certificates = Vec::new();
        if let Some(ca) = &access.ca_file {
            extra_root_certificates.push(Certificate {
                encoding: CertificateEncoding::Pem,
                data: load_ca(ca)?,
            });
        }
        let config = ClientConfig {
            protocol: if access.plain_http {
                ClientProtocol::Http
            } else {
                ClientProtocol::Https
            },
            extra_root_certificates,
            read_timeout: access.read_timeout,
            connect_timeout: Some(Duration::from_secs(5)),
            // Deployment artifacts are single-platform; an index at a tag is not ours.
            platform_resolver: None,
            ..ClientConfig::default()
        };
        Ok(RegistryClient {
            client: Client::new(config),
            auth: match &access.credentials {
                Some(c) => RegistryAuth::Basic(c.username.clone(), c.password.clone()),
                None => RegistryAuth::Anonymous,
            },
        })
    }

    fn err(
        reference: &Reference,
    ) -> impl Fn(oci_client::errors::OciDistributionError) -> RegistryError + '_ {
        move |source| RegistryError::Registry {
            registry: reference.registry().to_string(),
            source,
        }
    }

    fn layout(reference: &Reference, reason: impl Into<String>) -> RegistryError {
        RegistryError::Layout {
            reference: display_reference(reference),
            reason: reason.into(),
        }
    }

    async fn login(&self, reference: &Reference) -> Result<(), RegistryError> {
        self.client
            .store_auth_if_needed(reference.resolve_registry(), &self.auth)
            .await;
        Ok(())
    }

    /// Pushes a manifest as exact bytes; returns its digest.
    async fn push_manifest(
        &self,
        reference: &Reference,
        manifest: &OciManifest,
    ) -> Result<String, RegistryError> {
        let body = serde_json::to_vec(manifest).expect("manifests serialize");
        let digest = sha256_digest(&body);
        let content_type = manifest
            .content_type()
            .parse()
            .expect("a valid header value");
        self.client
            .push_manifest_raw(reference, body, content_type)
            .await
            .map_err(Self::err(reference))?;
        Ok(digest)
    }

    async fn push_blob(
        &self,
        reference: &Reference,
        bytes: &[u8],
    ) -> Result<String, RegistryError> {
        let digest = sha256_digest(bytes);
        if !self
            .client
            .blob_exists(reference, &digest)
            .await
            .map_err(Self::err(reference))?
        {
            self.client
                .push_blob(reference, bytes.to_vec(), &digest)
                .await
                .map_err(Self::err(reference))?;
        }
        Ok(digest)
    }

    /// Pushes a component (or module) in the CNCF Wasm layout to `reference`'s tag: what
    /// `wkg oci push` writes. Returns the manifest digest.
    pub async fn push_wasm(
        &self,
        reference: &Reference,
        wasm: &[u8],
        author: Option<String>,
    ) -> Result<String, RegistryError> {
        self.login(reference).await?;
        let config = serde_json::to_vec(&WasmConfig::describe(wasm, author)).expect("serializes");
        let layer = OciDescriptor {
            media_type: WASM_LAYER_MEDIA_TYPE.into(),
            digest: self.push_blob(reference, wasm).await?,
            size: wasm.len() as i64,
            ..OciDescriptor::default()
        };
        let manifest = OciImageManifest {
            media_type: Some(OCI_IMAGE_MEDIA_TYPE.into()),
            config: OciDescriptor {
                media_type: WASM_CONFIG_MEDIA_TYPE.into(),
                digest: self.push_blob(reference, &config).await?,
                size: config.len() as i64,
                ..OciDescriptor::default()
            },
            layers: vec![layer],
            ..OciImageManifest::default()
        };
        self.push_manifest(reference, &OciManifest::Image(manifest))
            .await
    }

    /// Publishes a signed deployment under `reference`'s tag: the Wasm artifact at the tag, the
    /// deployment referrer pointing at it, and the referrers tag-schema index. Returns what the
    /// tag now resolves to.
    pub async fn publish(
        &self,
        reference: &Reference,
        source: &[u8],
        signed: &SignedManifest,
        artifacts: &[ArtifactLayer],
    ) -> Result<Published, RegistryError> {
        let author = Some(format!("edgectl (signer {})", signed.signer));
        let wasm_digest = self.push_wasm(reference, source, author).await?;
        let wasm_manifest_size = self
            .client
            .pull_manifest_raw(
                &reference.clone_with_digest(wasm_digest.clone()),
                &self.auth,
                &[OCI_IMAGE_MEDIA_TYPE],
            )
            .await
            .map_err(Self::err(reference))?
            .0
            .len();

        let id = signed.payload.id();
        let blake3_of = |hash: &str| {
            Some(BTreeMap::from([(
                BLAKE3_ANNOTATION.to_string(),
                hash.to_string(),
            )]))
        };
        let mut layers = vec![OciDescriptor {
            media_type: WASM_LAYER_MEDIA_TYPE.into(),
            digest: sha256_digest(source),
            size: source.len() as i64,
            annotations: blake3_of(&signed.payload.source.blake3),
            ..OciDescriptor::default()
        }];
        for artifact in artifacts {
            let mut annotations = blake3_of(&artifact.blake3).unwrap_or_default();
            annotations.insert(TARGET_ANNOTATION.into(), artifact.target.clone());
            layers.push(OciDescriptor {
                media_type: CWASM_MEDIA_TYPE.into(),
                digest: self.push_blob(reference, &artifact.bytes).await?,
                size: artifact.bytes.len() as i64,
                annotations: Some(annotations),
                ..OciDescriptor::default()
            });
        }
        let config = serde_json::to_vec(signed).expect("serializes");
        let annotations = BTreeMap::from([(DEPLOYMENT_ANNOTATION.to_string(), id.clone())]);
        let referrer = OciImageManifest {
            media_type: Some(OCI_IMAGE_MEDIA_TYPE.into()),
            artifact_type: Some(DEPLOYMENT_ARTIFACT.into()),
            config: OciDescriptor {
                media_type: SIGNED_MANIFEST_MEDIA_TYPE.into(),
                digest: self.push_blob(reference, &config).await?,
                size: config.len() as i64,
                ..OciDescriptor::default()
            },
            layers,
            subject: Some(OciDescriptor {
                media_type: OCI_IMAGE_MEDIA_TYPE.into(),
                digest: wasm_digest.clone(),
                size: wasm_manifest_size as i64,
                ..OciDescriptor::default()
            }),
            annotations: Some(annotations.clone()),
            ..OciImageManifest::default()
        };
        let referrer_bytes =
            serde_json::to_vec(&OciManifest::Image(referrer.clone())).expect("serializes");
        let deployment_digest = sha256_digest(&referrer_bytes);
        let deployment = Reference::with_digest(
            reference.registry().to_string(),
            reference.repository().to_string(),
            deployment_digest.clone(),
        );
        self.push_manifest(&deployment, &OciManifest::Image(referrer))
            .await?;

        // The referrers tag schema: registries without the referrers API list referrers in an
        // index under `sha256-<hex>`. Others' entries there are kept.
        let subject = reference.clone_with_digest(wasm_digest.clone());
        let mut index = match self.client.pull_referrers(&subject, None).await {
            Ok(index) => index,
            Err(_) => empty_index(),
        };
        index.manifests.retain(|m| m.digest != deployment_digest);
        index.manifests.push(oci_client::manifest::ImageIndexEntry {
            media_type: OCI_IMAGE_MEDIA_TYPE.into(),
            digest: deployment_digest,
            size: referrer_bytes.len() as i64,
            platform: None,
            annotations: Some(annotations),
            artifact_type: Some(DEPLOYMENT_ARTIFACT.into()),
        });
        let tag_ref = Reference::with_tag(
            reference.registry().to_string(),
            reference.repository().to_string(),
            wasm_digest.replacen(':', "-", 1),
        );
        self.push_manifest(&tag_ref, &OciManifest::ImageIndex(index))
            .await?;
        Ok(Published {
            wasm_digest,
            deployment,
            signed: signed.clone(),
        })
    }

    /// The Wasm artifact at `reference`: its one `application/wasm` layer, as published by
    /// `wkg oci push`, `edgectl publish` or any tool following the CNCF layout. Returns the
    /// bytes (digest-checked by the client) and the manifest digest.
    pub async fn pull_wasm(
        &self,
        reference: &Reference,
    ) -> Result<(Vec<u8>, String), RegistryError> {
        self.login(reference).await?;
        let (manifest, digest) = self
            .client
            .pull_image_manifest(reference, &self.auth)
            .await
            .map_err(Self::err(reference))?;
        if manifest.config.media_type != WASM_CONFIG_MEDIA_TYPE {
            return Err(Self::layout(
                reference,
                format!(
                    "config is {}, not a Wasm artifact ({WASM_CONFIG_MEDIA_TYPE})",
                    manifest.config.media_type
                ),
            ));
        }
        let [layer] = manifest.layers.as_slice() else {
            return Err(Self::layout(
                reference,
                format!(
                    "a Wasm artifact has one layer; this one has {}",
                    manifest.layers.len()
                ),
            ));
        };
        if layer.media_type != WASM_LAYER_MEDIA_TYPE {
            return Err(Self::layout(
                reference,
                format!("layer is {}, not {WASM_LAYER_MEDIA_TYPE}", layer.media_type),
            ));
        }
        let mut out = Vec::with_capacity(layer.size.max(0) as usize);
        self.client
            .pull_blob(reference, layer, &mut out)
            .await
            .map_err(Self::err(reference))?;
        Ok((out, digest))
    }

    /// What `reference` (a tag) resolves to: its Wasm artifact and the newest edged deployment
    /// that refers to it.
    pub async fn resolve(&self, reference: &Reference) -> Result<Published, RegistryError> {
        self.login(reference).await?;
        let (_, wasm_digest) = self
            .client
            .pull_image_manifest(reference, &self.auth)
            .await
            .map_err(Self::err(reference))?;
        let subject = reference.clone_with_digest(wasm_digest.clone());
        let index = self
            .client
            .pull_referrers(&subject, Some(DEPLOYMENT_ARTIFACT))
            .await
            .map_err(Self::err(reference))?;
        let mut newest: Option<(SignedManifest, Reference)> = None;
        for entry in index.manifests {
            let pinned = Reference::with_digest(
                reference.registry().to_string(),
                reference.repository().to_string(),
                entry.digest.clone(),
            );
            let layers = self.deployment_layers(&pinned).await?;
            if newest
                .as_ref()
                .is_none_or(|(s, _)| s.payload.version < layers.signed.payload.version)
            {
                newest = Some((layers.signed, pinned));
            }
        }
        let (signed, deployment) = newest.ok_or_else(|| {
            Self::layout(
                reference,
                "holds a Wasm artifact but no edged deployment refers to it (publish it with \
                 `edgectl publish`, or deploy the component with `edgectl push oci://…`)",
            )
        })?;
        Ok(Published {
            wasm_digest,
            deployment,
            signed,
        })
    }

    /// A deployment referrer, pinned by digest: the signed manifest in its config and its
    /// layers by BLAKE3 name. Nothing here is trusted yet: the caller admits the signed manifest
    /// and checks every blob against it.
    pub async fn deployment_layers(
        &self,
        pinned: &Reference,
    ) -> Result<DeploymentLayers, RegistryError> {
        self.login(pinned).await?;
        let (manifest, _) = self
            .client
            .pull_image_manifest(pinned, &self.auth)
            .await
            .map_err(Self::err(pinned))?;
        if manifest.config.media_type != SIGNED_MANIFEST_MEDIA_TYPE {
            return Err(Self::layout(
                pinned,
                format!(
                    "not an edged deployment (config {}, expected {SIGNED_MANIFEST_MEDIA_TYPE})",
                    manifest.config.media_type
                ),
            ));
        }
        if manifest.config.size > 1 << 20 {
            return Err(Self::layout(pinned, "signed manifest larger than 1 MiB"));
        }
        let mut config = Vec::new();
        self.client
            .pull_blob(pinned, &manifest.config, &mut config)
            .await
            .map_err(Self::err(pinned))?;
        let signed: SignedManifest = serde_json::from_slice(&config)
            .map_err(|e| Self::layout(pinned, format!("undecodable signed manifest: {e}")))?;
        let blobs = manifest
            .layers
            .into_iter()
            .filter_map(|layer| {
                let hash = layer.annotations.as_ref()?.get(BLAKE3_ANNOTATION)?.clone();
                Some((hash, layer))
            })
            .collect();
        Ok(DeploymentLayers { signed, blobs })
    }

    /// Streams blob `layer` of `repository` from byte `offset` on (HTTP Range). Returns the
    /// offset the stream really starts at: 0 when the registry ignored the range.
    pub async fn blob_from(
        &self,
        repository: &Reference,
        layer: &OciDescriptor,
        offset: u64,
    ) -> Result<
        (
            u64,
            futures_util::stream::BoxStream<'static, std::io::Result<bytes::Bytes>>,
        ),
        RegistryError,
    > {
        self.login(repository).await?;
        let response = self
            .client
            .pull_blob_stream_partial(repository, layer, offset, None)
            .await
            .map_err(Self::err(repository))?;
        Ok(match response {
            BlobResponse::Full(stream) => (0, stream.stream),
            BlobResponse::Partial(stream) => (offset, stream.stream),
        })
    }

    /// Reads a whole stream from [`RegistryClient::blob_from`] (small blobs, tests).
    pub async fn collect(
        registry: &str,
        digest: &str,
        mut stream: futures_util::stream::BoxStream<'static, std::io::Result<bytes::Bytes>>,
    ) -> Result<Vec<u8>, RegistryError> {
        let mut out = Vec::new();
        while let Some(chunk) = stream.next().await {
            out.extend_from_slice(&chunk.map_err(|e| RegistryError::Stream {
                registry: registry.into(),
                digest: digest.into(),
                reason: e.to_string(),
            })?);
        }
        Ok(out)
    }
}

fn empty_index() -> OciImageIndex {
    OciImageIndex {
        schema_version: 2,
        media_type: Some(OCI_IMAGE_INDEX_MEDIA_TYPE.into()),
        manifests: Vec::new(),
        artifact_type: None,
        annotations: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_must_be_oci_urls_naming_a_host() {
        let r = parse_reference("oci://127.0.0.1:5000/apps/hello:v1").unwrap();
        assert_eq!(r.registry(), "127.0.0.1:5000");
        assert_eq!(r.repository(), "apps/hello");
        assert_eq!(r.tag(), Some("v1"));
        assert_eq!(display_reference(&r), "oci://127.0.0.1:5000/apps/hello:v1");
        assert!(matches!(
            parse_reference("127.0.0.1:5000/apps/hello:v1"),
            Err(RegistryError::NotOci(_))
        ));
        let e = parse_reference("oci://apps/hello:v1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("registry host"), "{e}");
    }

    #[test]
    fn credentials_never_show_the_password() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("creds");
        std::fs::write(&path, "ci-bot:s3cr:et\n").unwrap();
        let c = Credentials::load(&path).unwrap();
        assert_eq!(c.username, "ci-bot");
        assert_eq!(c.password, "s3cr:et");
        let shown = format!(
            "{c:?} {:?}",
            Access {
                credentials: Some(c.clone()),
                ..Access::default()
            }
        );
        assert!(!shown.contains("s3cr"), "{shown}");
        std::fs::write(&path, "no colon here\n").unwrap();
        let e = Credentials::load(&path).unwrap_err().to_string();
        assert!(
            e.contains("USERNAME:PASSWORD") && e.contains("creds"),
            "{e}"
        );
    }

    #[test]
    fn a_ca_file_must_hold_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a certificate\n").unwrap();
        let e = load_ca(&path).unwrap_err().to_string();
        assert!(
            e.contains("no PEM certificate") && e.contains("ca.pem"),
            "{e}"
        );
        let e = load_ca(&dir.path().join("absent.pem"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot read"), "{e}");
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        std::fs::write(&path, cert.cert.pem()).unwrap();
        assert!(load_ca(&path).is_ok());
    }

    #[test]
    fn wasm_config_follows_the_cncf_layout() {
        let module = wat::parse_str("(module)").unwrap();
        let config = WasmConfig::describe(&module, None);
        assert_eq!(
            (config.architecture.as_str(), config.os.as_str()),
            ("wasm", "wasip1")
        );
        assert_eq!(config.layer_digests, vec![sha256_digest(&module)]);
        assert!(config.component.is_none());
        let json = serde_json::to_value(&config).unwrap();
        assert!(json.get("layerDigests").is_some(), "{json}");
    }
}
