//! The registry-origin variant of the fleet phase: the same module `edgectl publish`ed to a real
//! OCI registry (Debian's `docker-registry`, the CNCF distribution registry, on loopback) and
//! deployed from there, two ways:
//!
//! - **registry + sync**: `edgectl deploy` to the first node only; the others learn of it by
//!   sync and take blobs from peers, the registry being the holder of last resort;
//! - **registry only**: `edgectl deploy` to every node at once, nodes without `[sync]`: each pulls
//!   its own copy from the registry.
//!
//! Each is timed from the deploy command's start until every node serves `/big` (unlike the
//! peer-sync figure, which starts after the push to the first node returned, this includes the
//! first node's own download). Registry egress is what the nodes pulled from it
//! (`edged_registry_fetched_bytes_total`, summed), in copies of the deployment's blobs.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::fleet::{
    Node, Params, edgectl, issue_node, node_counter, start_node, target, wait_for_all,
};

/// Where Debian's `docker-registry` package puts the registry.
pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// A distribution registry on a free loopback port with its own storage; killed on drop.
struct RegistryProcess {
    child: Child,
    host: String,
}

impl Drop for RegistryProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl RegistryProcess {
    fn start(dir: &Path) -> Result<RegistryProcess> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let config = dir.join("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  \
                 filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n  secret: \
                 bench\n",
                dir.join("registry-storage").display()
            ),
        )?;
        let log = std::fs::File::create(dir.join("registry.log"))?;
        let child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {REGISTRY_BIN}"))?;
        let registry = RegistryProcess {
            child,
            host: format!("127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!(
                    "the registry did not start; see {}",
                    dir.join("registry.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(registry)
    }
}

/// One way of deploying from the registry, measured in one round.
pub struct RegistryFleet {
    /// From the deploy command's start until every node served the deployment.
    pub convergence: Duration,
    /// Bytes the nodes pulled from the registry, in copies of the deployment's blobs.
    pub registry_copies: f64,
    /// With sync: bytes the first node served to peers, in copies of the blobs.
    pub first_node_copies: Option<f64>,
}

/// Both registry variants on `wasm` (whose source and artifact together are `blob_bytes`).
pub struct RegistryRound {
    pub with_sync: RegistryFleet,
    pub registry_only: RegistryFleet,
}

/// Whether the registry the variant needs is installed.
pub fn available() -> bool {
    Path::new(REGISTRY_BIN).exists()
}

pub async fn round(
    params: &Params,
    dir: &Path,
    operator: &Path,
    wasm: &Path,
    blob_bytes: f64,
) -> Result<RegistryRound> {
    let registry = RegistryProcess::start(dir)?;
    let reference = format!("oci://{}/bench/big:v1", registry.host);
    edgectl(
        params,
        operator,
        &[
            "--plain-http",
            "publish",
            wasm.to_str().context("non-UTF-8 temp path")?,
            &reference,
            "--name",
            "big",
            "--target",
            target(),
        ],
    )
    .await?;
    let table = format!("\n[registry]\nurl = \"http://{}\"\n", registry.host);

    // Registry + sync: deploy to the first node; the rest sync from it.
    let names: Vec<String> = (0..params.nodes).map(|i| format!("reg-sync-{i}")).collect();
    for name in &names {
        issue_node(params, operator, dir, name).await?;
    }
    let mut nodes: Vec<Node> = Vec::with_capacity(params.nodes);
    for name in &names {
        let peers: Vec<SocketAddr> = nodes.iter().map(|n| n.info.control).collect();
        nodes.push(start_node(params, dir, name, Some(&peers), &table)?);
    }
    let started = Instant::now();
    deploy(params, operator, &nodes[0], &reference).await?;
    let arrivals = wait_for_all(&nodes, started).await?;
    let convergence = arrivals.iter().map(|a| a.1).max().unwrap_or_default();
    tokio::time::sleep(crate::fleet::SYNC_INTERVAL).await;
    let pulled = pulled_bytes(&nodes).await?;
    let first_served = node_counter(&nodes[0].info, "edged_sync_served_bytes_total")
        .await?
        .unwrap_or(0.0);
    let with_sync = RegistryFleet {
        convergence,
        registry_copies: pulled / blob_bytes,
        first_node_copies: Some(first_served / blob_bytes),
    };
    drop(nodes);

    // Registry only: every node deploys from the registry at once.
    let names: Vec<String> = (0..params.nodes).map(|i| format!("reg-only-{i}")).collect();
    for name in &names {
        issue_node(params, operator, dir, name).await?;
    }
    let mut nodes: Vec<Node> = Vec::with_capacity(params.nodes);
    for name in &names {
        nodes.push(start_node(params, dir, name, None, &table)?);
    }
    let started = Instant::now();
    let deploys = nodes
        .iter()
        .map(|n| deploy(params, operator, n, &reference));
    futures_util::future::try_join_all(deploys).await?;
    let arrivals = wait_for_all(&nodes, started).await?;
    let convergence = arrivals.iter().map(|a| a.1).max().unwrap_or_default();
    let pulled = pulled_bytes(&nodes).await?;
    let registry_only = RegistryFleet {
        convergence,
        registry_copies: pulled / blob_bytes,
        first_node_copies: None,
    };
    Ok(RegistryRound {
        with_sync,
        registry_only,
    })
}

async fn deploy(params: &Params, operator: &Path, node: &Node, reference: &str) -> Result<()> {
    edgectl(
        params,
        operator,
        &[
            "--node",
            &node.info.control.to_string(),
            "--plain-http",
            "deploy",
            reference,
        ],
    )
    .await
    .map(drop)
}

/// Bytes all `nodes` pulled from the registry.
async fn pulled_bytes(nodes: &[Node]) -> Result<f64> {
    let mut total = 0.0;
    for node in nodes {
        total += node_counter(&node.info, "edged_registry_fetched_bytes_total")
            .await?
            .unwrap_or(0.0);
    }
    Ok(total)
}
