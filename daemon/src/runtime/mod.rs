//! How a prepared function's guests run, in one place. Every function has one [`Runtime`],
//! chosen once when it is prepared from what its artifact proved to be and its instance policy:
//!
//! | guest | runtime | instance |
//! |---|---|---|
//! | WASI p1 command | [`Runtime::Command`] ([`command`]) | fresh per request, CGI-style |
//! | `wasi:http` 0.2 component, default policy | [`Runtime::FreshComponent`] ([`fresh`]) | fresh per request, run inline in the request's task |
//! | `wasi:http` 0.3 component, or 0.2 with reuse | [`Runtime::Reused`] ([`reused`]) | reused, wasmtime-wasi-http's worker pool with edged's rules |
//!
//! The serving core admits a request (body cap, permit) and calls [`Runtime::handle`]; the one
//! `match` below is where the kinds part ways. Adding a guest kind: the compiler's `GuestKind`,
//! an arm in [`Runtime::new`] and in the two dispatches here, and a module beside these three.
//!
//! Whatever a guest does wrong ends as a [`Fault`] for that request only; every instance gets
//! the function's memory cap and an epoch deadline.

pub mod command;
pub mod fresh;
pub mod lost;
pub mod reused;
pub mod setup;

use anyhow::Result;
use edged_artifacts::Prepared;
use edged_compiler::GuestKind;
use edged_node_config::InstancePolicy;
use http::{Request, Response};
use http_body_util::BodyExt;
use tokio_util::task::TaskTracker;
use wasmtime::component::InstancePre;
use wasmtime_wasi_http::handler::ProxyPre as Handler;

use crate::body::{Guarded, RequestBody, RequestBodyError, ResponseBody};
use crate::fault::Fault;
use crate::sandbox::GuestState;

pub use reused::Instances;
pub use setup::{GuestSetup, InstanceEnv, InstanceMetrics};

/// Why a request did not reach its guest or its guest failed it: the serving core answers
/// each with its own status.
#[derive(Debug)]
pub enum Failure {
    /// The request body could not be read whole (paths that collect it before the guest runs).
    Body(RequestBodyError),
    /// The guest (or the host on its behalf) failed the request.
    Fault(Fault),
}

impl From<Fault> for Failure {
    fn from(fault: Fault) -> Failure {
        Failure::Fault(fault)
    }
}

/// How one function's guests run.
pub enum Runtime {
    Command(command::Command),
    FreshComponent(fresh::FreshComponent),
    Reused(Instances),
}

impl Runtime {
    /// The runtime for `prepared`: the kind its bindings prove (a manifest cannot make the node
    /// call an export the component lacks; `recorded` only says which to try first) and the
    /// instance policy resolved against it. Returns the notes resolving the policy produced.
    pub fn new(
        prepared: &Prepared<GuestState>,
        recorded: GuestKind,
        setup: GuestSetup,
    ) -> Result<(Runtime, Vec<String>)> {
        let pre = match prepared {
            Prepared::Module(pre) => {
                let (policy, notes) =
                    InstancePolicy::resolve(GuestKind::P1Command, &setup.config.instances);
                let command = command::Command::new(pre.clone(), setup, policy);
                return Ok((Runtime::Command(command), notes));
            }
            Prepared::Component(pre) => pre,
        };
        let handler = component_handler(pre, recorded)?;
        let guest = match &handler {
            Handler::P2(_) => GuestKind::HttpP2,
            Handler::P3(_) => GuestKind::HttpP3,
        };
        let (policy, notes) = InstancePolicy::resolve(guest, &setup.config.instances);
        // A p2 guest served fresh keeps edged's own inline path (no worker task per request);
        // everything that reuses instances, and every p3 guest, goes through the instance pool.
        let runtime = match handler {
            Handler::P2(pre) if !policy.reuses() => {
                Runtime::FreshComponent(fresh::FreshComponent::new(pre, setup, policy))
            }
            handler => Runtime::Reused(Instances::new(handler, setup, guest, policy)),
        };
        Ok((runtime, notes))
    }

    /// The kind of guest it runs, as its bindings proved.
    pub fn guest_kind(&self) -> GuestKind {
        match self {
            Runtime::Command(_) => GuestKind::P1Command,
            Runtime::FreshComponent(_) => GuestKind::HttpP2,
            Runtime::Reused(instances) => instances.guest_kind(),
        }
    }

    /// How its instances are used: fresh per request, or reused.
    pub fn policy(&self) -> InstancePolicy {
        match self {
            Runtime::Command(run) => run.policy,
            Runtime::FreshComponent(run) => run.policy,
            Runtime::Reused(instances) => instances.policy(),
        }
    }

    /// Runs one admitted request. `done` is called exactly once, when the guest has finished
    /// with the request (which may be after the response head: a streaming body), with its
    /// fault if any: it carries the request's permit and in-flight count. Guests that outlive
    /// their response head run on `tracker`, so a drain waits for them.
    pub async fn handle(
        &self,
        request: Request<RequestBody>,
        done: impl FnOnce(Option<&Fault>) + Send + 'static,
        tracker: &TaskTracker,
    ) -> Result<Response<ResponseBody>, Failure> {
        match self {
            Runtime::Command(run) => {
                let request = match collect(request).await {
                    Ok(request) => request,
                    Err(refused) => {
                        done(None);
                        return Err(refused);
                    }
                };
                let result = run.handle(request).await;
                done(result.as_ref().err());
                Ok(result?)
            }
            Runtime::FreshComponent(run) => {
                let request = match collect(request).await {
                    Ok(request) => request,
                    Err(refused) => {
                        done(None);
                        return Err(refused);
                    }
                };
                Ok(run.handle(request, done, tracker).await?)
            }
            Runtime::Reused(instances) => match instances.handle(request).await {
                Ok(response) => {
                    let guard = DoneOnDrop(Some(Box::new(done)));
                    Ok(response.map(|body| Guarded::new(body, guard).boxed_unsync()))
                }
                Err(fault) => {
                    done(Some(&fault));
                    Err(Failure::Fault(fault))
                }
            },
        }
    }

    /// Creates one instance in a throwaway store and drops it, running no guest code beyond
    /// instantiation: proof that the deployment links against the host and fits the instance
    /// pool and the function's memory cap.
    pub async fn instantiate_once(&self) -> Result<(), Fault> {
        match self {
            Runtime::Command(run) => run.instantiate_once().await,
            Runtime::FreshComponent(run) => run.instantiate_once().await,
            Runtime::Reused(instances) => instances.instantiate_once().await,
        }
    }
}

/// What to call once the guest is done with a request (see [`Runtime::handle`]).
type Done = Box<dyn FnOnce(Option<&Fault>) + Send>;

/// A reused instance's `done`, called when its response body is finished or dropped.
struct DoneOnDrop(Option<Done>);

impl Drop for DoneOnDrop {
    fn drop(&mut self) {
        if let Some(done) = self.0.take() {
            done(None);
        }
    }
}

/// The whole request body, for the runtimes that hand a guest its body at once.
async fn collect(request: Request<RequestBody>) -> Result<Request<bytes::Bytes>, Failure> {
    let (parts, body) = request.into_parts();
    match body.collect().await {
        Ok(collected) => Ok(Request::from_parts(parts, collected.to_bytes())),
        Err(e) => Err(Failure::Body(RequestBodyError::of(&e))),
    }
}

/// The typed handler view of a component: `wasi:http` 0.3 first when the manifest says so, else
/// 0.2; whichever binds.
fn component_handler(
    pre: &InstancePre<GuestState>,
    recorded: GuestKind,
) -> Result<Handler<GuestState>> {
    let p3 = || wasmtime_wasi_http::p3::bindings::ServicePre::new(pre.clone()).map(Handler::P3);
    let p2 = || wasmtime_wasi_http::p2::bindings::ProxyPre::new(pre.clone()).map(Handler::P2);
    let bound = match recorded {
        GuestKind::HttpP3 => p3().or_else(|_| p2()),
        _ => p2().or_else(|_| p3()),
    };
    bound.map_err(anyhow::Error::from)
}
