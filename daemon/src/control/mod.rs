//! The node's side of the QUIC control plane. This file is the server: mutual TLS against the
//! fleet CA, the role a peer certificate carries, and one handler per request kind; it only
//! dispatches. The parts:
//!
//! - [`push`]: receiving an operator's push (offer → blobs → commit), around the sans-IO
//!   [`push_session`] core;
//! - [`peer_serving`]: answering peers that sync from this node (holdings, manifests, blob
//!   slices), one fetcher per blob within a cap;
//! - a deploy from an OCI registry is one call into the [`RegistryOrigin`];
//! - everything else (list, status, activate, rollback, remove, invoke) is one call into the
//!   deployments or serving core.
//!
//! What sync must hear of (a node connected, a peer announced news) goes out as [`PeerNews`].

pub mod peer_serving;
pub mod push;
pub mod push_session;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use edged_control::identity::{self, Role, role_of};
use edged_control::transport::{TransportError, read_frame, write_frame};
use edged_control::wire::{NodeStatus, Request, Response};
use edged_control::{FleetIdentity, TrustedKeys};
use edged_node_config::ControlConfig;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;

use crate::deployments::{Applied, Deployments};
use crate::events::{PeerNews, SyncStatusSource};
use crate::piece_exchange::PieceExchange;
use crate::registry_origin::RegistryOrigin;
use peer_serving::PeerServing;
use push::Pushes;

/// This node's fleet identity and the keys it trusts, loaded from `[control]`.
pub struct ControlIdentity {
    fleet: FleetIdentity,
    pub trusted: TrustedKeys,
    pub node_name: String,
}

impl ControlIdentity {
    /// Loads the identity, creating the throwaway dev fleet first if the config asks for it.
    pub fn load(config: &ControlConfig) -> Result<ControlIdentity> {
        if config.dev_identity && !config.identity_dir.join("ca.pem").exists() {
            identity::init_operator_dir(&config.identity_dir, "dev-operator")?;
            identity::issue_node_files(
                &config.identity_dir,
                &config.node_name,
                &config.identity_dir,
            )?;
            tracing::warn!(
                dir = %config.identity_dir.display(),
                "generated a throwaway dev fleet identity; do not use it in production"
            );
        }
        Ok(ControlIdentity {
            fleet: FleetIdentity::load(&config.identity_dir, &config.node_name)?
                .with_congestion(config.congestion),
            trusted: identity::trusted_keys(&config.trusted_keys)?,
            node_name: config.node_name.clone(),
        })
    }

    /// The QUIC endpoint: serves the control plane, and sync dials peers from it.
    pub fn bind(&self, listen: SocketAddr) -> Result<quinn::Endpoint> {
        quinn::Endpoint::server(self.fleet.server_config()?, listen)
            .with_context(|| format!("binding QUIC control on {listen}"))
    }

    /// The client side of this node's identity, for sync's outbound connections.
    pub fn client_config(&self) -> Result<quinn::ClientConfig> {
        Ok(self.fleet.client_config()?)
    }
}

pub struct ControlServer {
    deployments: Arc<Deployments>,
    pushes: Pushes,
    peer_serving: PeerServing,
    node_name: String,
    news: mpsc::UnboundedSender<PeerNews>,
    sync_status: Option<Arc<dyn SyncStatusSource>>,
    origin: Option<Arc<RegistryOrigin>>,
    exchange: Arc<PieceExchange>,
}

/// What the control server shares with sync.
pub struct PeerLinks {
    /// Where news of peers goes (sync, when it runs).
    pub news: mpsc::UnboundedSender<PeerNews>,
    /// What `edgectl status` shows of sync.
    pub sync_status: Option<Arc<dyn SyncStatusSource>>,
    /// The piece exchange: sync feeds it, the server serves pieces from it.
    pub exchange: Arc<PieceExchange>,
}

impl ControlServer {
    /// `max_serving` caps blobs served to peers at once; `peers` is how the server and sync
    /// talk; `origin` (with `[registry]`) answers deploys from an OCI registry.
    pub fn new(
        deployments: Arc<Deployments>,
        node_name: String,
        max_serving: usize,
        peers: PeerLinks,
        origin: Option<Arc<RegistryOrigin>>,
        registry: &mut Registry,
    ) -> Arc<ControlServer> {
        let PeerLinks {
            news,
            sync_status,
            exchange,
        } = peers;
        Arc::new(ControlServer {
            pushes: Pushes::new(deployments.clone()),
            peer_serving: PeerServing::new(
                deployments.clone(),
                exchange.clone(),
                max_serving,
                registry,
            ),
            exchange,
            deployments,
            node_name,
            news,
            sync_status,
            origin,
        })
    }

    /// Accepts connections until the endpoint closes.
    pub async fn serve(self: Arc<Self>, endpoint: quinn::Endpoint) {
        while let Some(incoming) = endpoint.accept().await {
            let server = self.clone();
            tokio::spawn(async move {
                if let Err(e) = server.connection(incoming).await {
                    tracing::info!(error = %format!("{e:#}"), "control connection ended");
                }
            });
        }
    }

    async fn connection(self: Arc<Self>, incoming: quinn::Incoming) -> Result<()> {
        let remote = incoming.remote_address();
        // The TLS handshake fails here for a client certificate not from the fleet CA.
        let conn = incoming
            .await
            .with_context(|| format!("handshake with {remote} refused"))?;
        let certs = identity::peer_certificates(&conn)
            .ok_or_else(|| anyhow!("{remote} presented no certificate"))?;
        let leaf = certs
            .first()
            .ok_or_else(|| anyhow!("{remote}: empty certificate chain"))?;
        let role = match role_of(leaf) {
            Ok(role) => role,
            Err(e) => {
                conn.close(2u32.into(), b"certificate carries no edged role");
                bail!("{remote}: {e}");
            }
        };
        let peer = identity::common_name(leaf);
        tracing::info!(%remote, %peer, %role, "control connection");
        if role == Role::Node {
            // Peers sync from their control endpoint, so this is where they can be reached.
            // Without sync nobody listens, which is fine.
            let _ = self.news.send(PeerNews::Connected {
                addr: remote,
                node_name: peer.clone(),
            });
        }
        // Each request stream is served on its own task: a push sends its blobs concurrently,
        // and a long upload must not hold up `status` or `ls` on the same connection.
        loop {
            let (send, recv) = match conn.accept_bi().await {
                Ok(streams) => streams,
                Err(quinn::ConnectionError::ApplicationClosed(_)) => return Ok(()),
                Err(e) => return Err(e.into()),
            };
            let (server, conn, peer) = (self.clone(), conn.clone(), peer.clone());
            tokio::spawn(async move {
                if let Err(e) = server.stream(&conn, role, &peer, send, recv).await {
                    tracing::info!(%peer, error = %format!("{e:#}"), "control stream ended");
                }
            });
        }
    }

    /// One request and its answer on one bidirectional stream.
    async fn stream(
        &self,
        conn: &quinn::Connection,
        role: Role,
        peer: &str,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) -> Result<()> {
        let request: Request = match read_frame(&mut recv).await {
            Ok(request) => request,
            Err(TransportError::Wire(e)) => {
                // A protocol violation ends the connection, never the daemon.
                tracing::warn!(%peer, error = %e, "bad control frame; closing the connection");
                let reason = e.to_string();
                conn.close(1u32.into(), reason.as_bytes());
                bail!("{peer}: {e}");
            }
            Err(e) => return Err(e.into()),
        };
        let response = match authorize(role, &request) {
            Err(message) => Response::Error { message },
            // The one answer followed by raw bytes: written by its handler.
            Ok(()) => match request {
                Request::FetchBlob { hash, start } => {
                    match self
                        .peer_serving
                        .serve_blob(&hash, start, peer, &mut send)
                        .await
                    {
                        None => return Ok(()),
                        Some(answer) => answer,
                    }
                }
                Request::FetchPiece { hash, index } => {
                    match self
                        .peer_serving
                        .serve_piece(&hash, index, peer, &mut send)
                        .await
                    {
                        None => return Ok(()),
                        Some(answer) => answer,
                    }
                }
                request => self
                    .handle(request, &mut recv, peer)
                    .await
                    .unwrap_or_else(|e| Response::Error {
                        message: format!("{e:#}"),
                    }),
            },
        };
        if let Response::Error { message } = &response {
            tracing::info!(%peer, "control request refused: {message}");
        }
        write_frame(&mut send, &response).await?;
        let _ = send.finish();
        Ok(())
    }

    /// Dispatches one request to its handler.
    async fn handle(
        &self,
        request: Request,
        recv: &mut quinn::RecvStream,
        peer: &str,
    ) -> Result<Response> {
        let deployments = &self.deployments;
        Ok(match request {
            Request::Offer { manifest } => Response::Needed {
                blobs: self.pushes.offer(*manifest)?,
            },
            Request::PutBlob {
                manifest_id,
                hash,
                offset,
            } => {
                self.pushes
                    .put_blob(&manifest_id, &hash, offset, recv)
                    .await?;
                Response::Stored { hash }
            }
            Request::Commit {
                manifest_id,
                activate,
            } => {
                self.pushes.commit(&manifest_id, activate).await?;
                tracing::info!(deployment = %manifest_id, %peer, "push committed");
                Response::Committed {
                    id: manifest_id,
                    active: activate,
                }
            }
            Request::Deploy {
                manifest,
                reference,
                activate,
            } => {
                let origin = self.origin.as_ref().ok_or_else(|| {
                    anyhow!("this node has no [registry] table; it does not pull from registries")
                })?;
                let id = manifest.payload.id();
                origin.deploy(&manifest, &reference, activate).await?;
                tracing::info!(deployment = %id, %peer, %reference, "deploy from the registry committed");
                Response::Committed {
                    id,
                    active: activate,
                }
            }
            Request::List {} => Response::Deployments {
                items: deployments.list()?,
            },
            Request::Holdings {} => Response::Holdings {
                items: deployments.holdings()?,
                activations: deployments.fleet_records()?,
                partial: self.exchange.partial_blobs(),
            },
            Request::ActivateFleet { record } => {
                let id = record.payload.id();
                let message = match deployments.apply_activation(&record).await? {
                    Applied::Activated => format!("fleet record {id} applied: active here"),
                    Applied::AlreadyApplied => format!("fleet record {id} was already applied"),
                    Applied::Pending => format!(
                        "fleet record {id} applied; this node does not hold the version yet and \
                         activates it when it arrives"
                    ),
                    Applied::NotServable(reason) => bail!(
                        "fleet record {id} is stored and spreads to peers, but this node cannot \
                         serve its version: {reason}"
                    ),
                };
                tracing::info!(%peer, "{message}");
                Response::Done { message }
            }
            Request::GetManifest { name, version } => Response::Manifest {
                signed: deployments.signed_manifest(&name, version)?,
            },
            Request::FetchBlob { .. } | Request::FetchPiece { .. } => {
                bail!("blob and piece fetches are answered on their stream")
            }
            Request::Announce {} => {
                let _ = self.news.send(PeerNews::Announced);
                Response::Done {
                    message: "noted".into(),
                }
            }
            Request::Have { hash, size, index } => {
                // Uploading here (this node may seed the blob) and fetching (it may be getting
                // it too) both want to know.
                self.exchange.peer_has(&hash, peer, index);
                let _ = self.news.send(PeerNews::Has {
                    node_name: peer.to_string(),
                    hash,
                    size,
                    index,
                });
                Response::Done {
                    message: "noted".into(),
                }
            }
            Request::Status {} => self.status()?,
            Request::Activate { name, version } => {
                deployments.activate(&name, version).await?;
                Response::Done {
                    message: format!("{name}@{version} is active"),
                }
            }
            Request::Rollback { name } => {
                let (from, to) = deployments.rollback(&name).await?;
                Response::Done {
                    message: format!("{name} rolled back from {from} to {to}"),
                }
            }
            Request::Remove { name, version } => {
                deployments.remove(&name, version)?;
                Response::Done {
                    message: format!("{name}@{version} removed (its blobs go at the next gc)"),
                }
            }
            Request::Invoke {
                name,
                method,
                path,
                body,
            } => {
                let (status, body) = deployments
                    .serving()
                    .invoke_by_name(&name, &method, &path, body)
                    .await?;
                Response::Invoked { status, body }
            }
        })
    }

    fn status(&self) -> Result<Response> {
        let serving = self.deployments.serving();
        let blobs = serving.store().blobs()?;
        let sync = self.sync_status.as_ref().map(|source| {
            let mut status = source.sync_status();
            status.served_bytes = self.peer_serving.served_bytes();
            status
        });
        Ok(Response::Status {
            status: NodeStatus {
                node: self.node_name.clone(),
                version: env!("CARGO_PKG_VERSION").into(),
                target: serving.target().to_string(),
                fingerprint: serving.fingerprint().to_string(),
                functions_serving: serving.functions().len(),
                store_bytes: blobs.iter().map(|(_, m)| m.size).sum(),
                blobs: blobs.len(),
                sync,
                registry: self.origin.as_ref().map(|o| o.describe()),
            },
        })
    }
}

/// The one check of who may ask what: operator certificates may do anything, node certificates
/// what [`Request::required_role`] opens to them (sync, and read-only views).
fn authorize(role: Role, request: &Request) -> std::result::Result<(), String> {
    match (request.required_role(), role) {
        (Role::Node, _) | (Role::Operator, Role::Operator) => Ok(()),
        (Role::Operator, Role::Node) => Err(format!(
            "{role} certificates may only sync; this needs an operator certificate"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_certificates_are_refused_operator_requests_and_allowed_the_rest() {
        let (mut refused, mut allowed) = (0, 0);
        for request in Request::one_of_each() {
            assert_eq!(authorize(Role::Operator, &request), Ok(()), "{request:?}");
            let as_node = authorize(Role::Node, &request);
            match request.required_role() {
                Role::Operator => {
                    refused += 1;
                    assert_eq!(
                        as_node,
                        Err("node certificates may only sync; this needs an operator \
                             certificate"
                            .into()),
                        "{request:?}"
                    );
                }
                Role::Node => {
                    allowed += 1;
                    assert_eq!(as_node, Ok(()), "{request:?}");
                }
            }
        }
        assert!(
            refused > 0 && allowed > 0,
            "{refused} refused, {allowed} allowed"
        );
        // What sync itself sends a peer must stay open to node certificates.
        for request in [
            Request::Holdings {},
            Request::Announce {},
            Request::GetManifest {
                name: "app".into(),
                version: 1,
            },
            Request::FetchBlob {
                hash: "aa".repeat(32),
                start: 0,
            },
        ] {
            assert_eq!(authorize(Role::Node, &request), Ok(()), "{request:?}");
        }
    }
}
