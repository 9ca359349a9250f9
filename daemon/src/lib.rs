//! # edged (library)
//!
//! The node daemon's parts, used by the `edged` binary. Imports run one way, downwards:
//!
//! ```text
//! lifecycle                      wiring, signals, reload, drain
//!   │
//!   ├─► ingress                  HTTP: accept, /metrics /healthz /readyz, routing
//!   ├─► control                  QUIC server: roles, dispatch
//!   │     ├ push                   operator pushes      (shell) ─► push_session (sans-IO core)
//!   │     └ peer_serving           answering peers      (shell + ServeSlots core)
//!   ├─► sync                     fetching from peers   (shell) ─► policy (sans-IO core), fetch
//!   ├─► housekeeping, notify
//!   │
//!   ▼
//! registry_origin, pieces,       pulling published deployments from an OCI registry
//! piece_exchange                 (control's deploy and sync's last resort both use it); a
//!   │                            blob fetched piecewise on disk (sync keeps, control serves);
//!   │                            what this node and its peers hold in part, upload slots
//!   ▼
//! deployments                    needed blobs, commit, activate/rollback/remove, holdings;
//!   │                            emits events (shell) ─► rules (admission, fleet-record
//!   │                            sequencing, activation; sans-IO core)
//!   ▼
//! serving                        engine, live function set, admission, request metrics:
//!   │                            admits a request, hands it to the function's runtime
//!   ▼
//! preflight                      `edged check-config`'s checks of the files a config names
//!   ▼
//! functions                      deploying, preparing and routing functions
//!   ▼
//! runtime                        how a function's guests run, one `Runtime` per function:
//!   │                            command (p1 CGI), fresh (wasi:http 0.2 inline), reused
//!   │                            (every wasi:http 0.3 guest: the worker pool, deadlines,
//!   │                            never reusing a faulted instance)
//!   ▼
//! fault                          classifying guest faults
//!   ▼
//! sandbox, metrics, events       what a guest sees of the host (state, linkers, memory cap,
//!                                capabilities); the metrics registry; news
//!   ▼
//! body, epoch, lock,             HTTP bodies (streamed, guarded, coalesced); the epoch clock;
//! pool_sizing, guest_output,     poison-safe locking; the engine's pool fitted to this box's
//! swarm, memory                  address space; guests' stdout/stderr as log lines; the piece
//!                                exchange's decisions (sans-IO core); freed heap given back
//! ```
//!
//! A module imports only modules below it in this picture (parts on one line import none of
//! each other). News travels up or sideways only through [`events`]: the deployments core
//! broadcasts commits, the control server sends [`events::PeerNews`] to sync over a channel, and
//! reads sync's status through [`events::SyncStatusSource`].

pub mod body;
pub mod control;
pub mod deployments;
pub mod epoch;
pub mod events;
pub mod fault;
pub mod functions;
pub mod guest_output;
pub mod housekeeping;
pub mod ingress;
pub mod lifecycle;
pub mod lock;
pub mod memory;
pub mod metrics;
pub mod notify;
pub mod piece_exchange;
pub mod pieces;
pub mod pool_sizing;
pub mod preflight;
pub mod registry_origin;
pub mod runtime;
pub mod sandbox;
pub mod serving;
pub mod swarm;
pub mod sync;
