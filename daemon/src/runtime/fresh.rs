//! `wasi:http` 0.2 components served with a fresh instance per request (their default): the
//! guest runs inline in the request's task until it has answered and finished its body (the
//! common case: no task spawn, no cross-thread hand-off); a guest that streams past that point,
//! or keeps running after its answer, continues on the node's guest tracker.

use std::time::Instant;

use bytes::Bytes;
use edged_node_config::InstancePolicy;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tokio_util::task::TaskTracker;
use wasmtime::Store;
use wasmtime_wasi_http::WasiHttpView;
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;

use super::setup::{GuestSetup, fresh_store};
use crate::body::{ResponseBody, read_prefix};
use crate::fault::Fault;
use crate::sandbox::{GuestState, component_wasi};

/// A p2 component's fresh-instance runtime: its typed `wasi:http/proxy` view.
pub struct FreshComponent {
    proxy: ProxyPre<GuestState>,
    setup: GuestSetup,
    pub(super) policy: InstancePolicy,
}

impl FreshComponent {
    pub fn new(
        proxy: ProxyPre<GuestState>,
        setup: GuestSetup,
        policy: InstancePolicy,
    ) -> FreshComponent {
        FreshComponent {
            proxy,
            setup,
            policy,
        }
    }

    /// A fresh store for one instance, with the function's capabilities, memory cap and
    /// deadline.
    fn store(&self) -> Result<Store<GuestState>, Fault> {
        let config = &self.setup.config;
        let limits = config.limits;
        let ctx = component_wasi(config, &self.setup.output)
            .map_err(|e| Fault::Host(format!("{e:#}")))?;
        let state = GuestState::component(ctx, self.setup.outbound.clone(), limits.memory_bytes);
        Ok(fresh_store(&self.setup.engine, state, limits.timeout))
    }

    /// See [`super::Runtime::instantiate_once`].
    pub async fn instantiate_once(&self) -> Result<(), Fault> {
        let mut store = self.store()?;
        self.proxy
            .instantiate_async(&mut store)
            .await
            .map(drop)
            .map_err(|e| Fault::classify(e, self.setup.config.limits.timeout))
    }

    /// Runs one request (body already collected) in a fresh instance. A guest that outlives
    /// the response head continues on `tracker` so a drain waits for it. `on_done` runs exactly
    /// once, when the guest ends, with its fault if any.
    pub async fn handle(
        &self,
        request: Request<Bytes>,
        on_done: impl FnOnce(Option<&Fault>) + Send + 'static,
        tracker: &TaskTracker,
    ) -> Result<Response<ResponseBody>, Fault> {
        // Created first, so that a request refused before its guest starts still reports its fault.
        let done = DoneGuard(Some(on_done));
        let limits = self.setup.config.limits;
        let proxy = self.proxy.clone();
        let mut store = match self.store() {
            Ok(store) => store,
            Err(fault) => return Err(done.fail(fault)),
        };
        let (sender, mut receiver) = tokio::sync::oneshot::channel();
        let request = request.map(|body| {
            Full::new(body).map_err(
                |never: std::convert::Infallible| -> wasmtime_wasi_http::Error { match never {} },
            )
        });
        let handles = store
            .data_mut()
            .http()
            .new_incoming_request(Scheme::Http, request)
            .and_then(|incoming| {
                let outparam = store.data_mut().http().new_response_outparam(sender)?;
                Ok((incoming, outparam))
            });
        let (incoming, outparam) = match handles {
            Ok(handles) => handles,
            Err(e) => return Err(done.fail(Fault::Host(format!("{e:#}")))),
        };

        let (instantiated_tx, mut instantiated_rx) = tokio::sync::oneshot::channel();
        let timeout = limits.timeout;
        let mut guest: GuestRun = Box::pin(async move {
            let started = Instant::now();
            let result = async {
                let guest = proxy.instantiate_async(&mut store).await?;
                let _ = instantiated_tx.send(started.elapsed());
                guest
                    .wasi_http_incoming_handler()
                    .call_handle(&mut store, incoming, outparam)
                    .await
            }
            .await;
            let fault = result.err().map(|e| Fault::classify(e, timeout));
            done.finish(fault.as_ref());
            fault
        });
        // `Some` once the guest has ended, with its fault if any.
        let mut ended: Option<Option<Fault>> = None;
        // Whatever path this takes, a guest that has not ended is handed to the tracker, never
        // dropped here: dropping it would cancel a guest that is still writing its response.
        let detach = |guest: GuestRun, ended: &Option<Option<Fault>>| {
            if ended.is_none() {
                tracker.spawn(guest);
            }
        };

        // 1. Drive the guest until it sets its response (or ends without one).
        let head = tokio::select! {
            biased;
            head = &mut receiver => head,
            fault = &mut guest => {
                ended = Some(fault);
                // The guest's store (and with it the sender) is gone: this resolves at once.
                receiver.await
            }
        };
        if let Ok(took) = instantiated_rx.try_recv() {
            self.setup.instance_created(took);
        }
        let response = match head {
            Ok(Ok(response)) => response,
            Ok(Err(code)) => {
                detach(guest, &ended);
                return Err(Fault::NoResponse(format!(
                    "guest answered with error {code:?}"
                )));
            }
            Err(_) => {
                let fault = match ended {
                    Some(fault) => fault,
                    None => guest.await,
                };
                return Err(fault.unwrap_or_else(|| {
                    Fault::NoResponse("handler returned without setting a response".into())
                }));
            }
        };

        // 2. Collect the body while the guest finishes it, within the coalescing limits.
        let (parts, mut body) = response.into_parts();
        let drive_guest = async {
            if ended.is_none() {
                ended = Some((&mut guest).await);
            }
        };
        let prefix = read_prefix(&mut body, drive_guest).await;
        detach(guest, &ended);
        match prefix {
            Ok(prefix) => Ok(Response::from_parts(parts, prefix.then(body))),
            // Nothing was sent yet, so the client gets a clean 5xx for a broken body.
            Err(e) => Err(match &ended {
                Some(Some(fault)) => fault.clone(),
                _ => Fault::NoResponse(format!("response body failed: {e}")),
            }),
        }
    }
}

type GuestRun = std::pin::Pin<Box<dyn Future<Output = Option<Fault>> + Send>>;

/// Calls `on_done` once: with the guest's outcome, or with `None` if the guest is dropped
/// before it ends (the client went away while it ran inline; wasmtime unwinds the call).
struct DoneGuard<F: FnOnce(Option<&Fault>)>(Option<F>);

impl<F: FnOnce(Option<&Fault>)> DoneGuard<F> {
    fn finish(mut self, fault: Option<&Fault>) {
        if let Some(on_done) = self.0.take() {
            on_done(fault);
        }
    }

    /// Ends the request with `fault` before its guest ran; returns it for the caller.
    fn fail(self, fault: Fault) -> Fault {
        self.finish(Some(&fault));
        fault
    }
}

impl<F: FnOnce(Option<&Fault>)> Drop for DoneGuard<F> {
    fn drop(&mut self) {
        if let Some(on_done) = self.0.take() {
            on_done(None);
        }
    }
}
