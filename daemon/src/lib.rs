//! # edged (library)
//!
//! The node daemon's parts, used by the `edged` binary and by the bench:
//!
//! - [`node`]: the running node — store, serving engine, function set, HTTP ingress (hyper),
//!   `/metrics` `/healthz` `/readyz`, SIGHUP reload and SIGTERM drain;
//! - [`functions`]: deploying config-declared functions and routing requests to them;
//! - [`invoke`]: one request in one fresh instance (WASI p1 CGI or `wasi:http/proxy`), with
//!   memory caps, epoch deadlines and fault classification;
//! - [`host`]: guest store state, linkers and capabilities (environment, preopens, outbound
//!   HTTP allowlist), denied by default;
//! - [`metrics`]: Prometheus metrics;
//! - [`notify`]: the systemd notify protocol and watchdog;
//! - [`control`]: the node's side of the QUIC control plane (push, list, activate, serving peers);
//! - [`sync`]: fetching the fleet's signed deployments from peers, verified while streaming.

pub mod control;
pub mod functions;
pub mod host;
pub mod invoke;
pub mod metrics;
pub mod node;
pub mod notify;
pub mod sync;
