//! Running one request in a fresh instance: WASI p1 commands CGI-style, `wasi:http/proxy`
//! 0.2 components natively. (Functions that reuse instances, every `wasi:http` 0.3 guest among
//! them, are run by [`crate::instances`].) Every instance gets the function's memory cap and an epoch deadline;
//! whatever the guest does wrong ends as a [`Fault`] for this request only.

use std::time::{Duration, Instant};

use bytes::Bytes;
use edged_snapshots::Prepared;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use tokio_util::task::TaskTracker;
use wasmtime::{Engine, Store, UpdateDeadline};
use wasmtime_wasi::I32Exit;
use wasmtime_wasi::p2::pipe::{MemoryInputPipe, MemoryOutputPipe};
use wasmtime_wasi_http::WasiHttpView;
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;

use crate::fault::Fault;
use crate::functions::Function;
use crate::host::{GuestState, component_wasi, wasi_builder};
use crate::instances::read_prefix;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ResponseBody = UnsyncBoxBody<Bytes, BoxError>;

/// Largest CGI response a p1 guest may write to stdout.
const MAX_CGI_OUTPUT: usize = 16 << 20;
/// Guest stderr kept for the log line of a fault.
const MAX_STDERR: usize = 4 << 10;

pub fn full_body(bytes: impl Into<Bytes>) -> ResponseBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A plain-text response the node writes itself (refusals, faults, health answers).
pub fn text_response(status: StatusCode, body: &str) -> Response<ResponseBody> {
    let mut response = Response::new(full_body(body.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Timing of one invocation, for metrics.
pub struct Timing {
    pub instantiate: Duration,
}

/// A store with the function's memory cap and deadline. Every epoch tick the guest yields to
/// the executor (so a busy guest cannot starve other requests on its worker thread), and once
/// `timeout` has passed the next tick interrupts it.
fn new_store(engine: &Engine, state: GuestState, timeout: Duration) -> Store<GuestState> {
    let mut store = Store::new(engine, state);
    store.limiter(|s| &mut s.limits);
    let started = Instant::now();
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(move |_| {
        if started.elapsed() >= timeout {
            Ok(UpdateDeadline::Interrupt)
        } else {
            Ok(UpdateDeadline::YieldCustom(
                1,
                Box::pin(tokio::task::yield_now()),
            ))
        }
    });
    store
}

/// A component's typed `wasi:http/proxy` view and a fresh store for one instance of it, with the
/// function's capabilities, memory cap and deadline.
fn proxy_store(
    engine: &Engine,
    function: &Function,
) -> Result<(ProxyPre<GuestState>, Store<GuestState>), Fault> {
    let limits = function.config.limits;
    let proxy = function
        .proxy
        .clone()
        .ok_or_else(|| Fault::Host("component has no wasi:http/proxy view".into()))?;
    let ctx = component_wasi(&function.config, &function.output)
        .map_err(|e| Fault::Host(format!("{e:#}")))?;
    let state = GuestState::component(ctx, function.outbound.clone(), limits.memory_bytes);
    Ok((proxy, new_store(engine, state, limits.timeout)))
}

/// Runs a WASI p1 command for `request` (body already collected), CGI-style.
pub async fn run_cgi(
    engine: &Engine,
    function: &Function,
    pre: &wasmtime::InstancePre<GuestState>,
    request: Request<Bytes>,
    timing: &mut Timing,
) -> Result<Response<ResponseBody>, Fault> {
    let limits = function.config.limits;
    let stdout = MemoryOutputPipe::new(MAX_CGI_OUTPUT);
    let stderr = MemoryOutputPipe::new(MAX_STDERR);
    let mut builder = wasi_builder(&function.config).map_err(|e| Fault::Host(format!("{e:#}")))?;
    for (key, value) in cgi_environment(&function.config.route, &request) {
        builder.env(key, value);
    }
    builder
        .stdin(MemoryInputPipe::new(request.into_body()))
        .stdout(stdout.clone())
        .stderr(stderr.clone());
    let state = GuestState::p1(builder.build_p1(), limits.memory_bytes);
    let mut store = new_store(engine, state, limits.timeout);

    let started = Instant::now();
    let result = async {
        let instance = pre.instantiate_async(&mut store).await?;
        timing.instantiate = started.elapsed();
        let start = instance.get_typed_func::<(), ()>(&mut store, "_start")?;
        start.call_async(&mut store, ()).await
    }
    .await;
    drop(store);
    match result {
        Ok(()) => {}
        Err(e) if e.downcast_ref::<I32Exit>().is_some_and(|exit| exit.0 == 0) => {}
        Err(e) => {
            let stderr = stderr.contents();
            if !stderr.is_empty() {
                tracing::info!(stderr = %String::from_utf8_lossy(&stderr), "guest stderr");
            }
            return Err(Fault::classify(e, limits.timeout));
        }
    }
    Ok(parse_cgi_output(stdout.contents()))
}

/// Creates one instance of `function` in a throwaway store and drops it, running no guest code
/// beyond instantiation: proof that the deployment links against the host and fits the
/// instance pool and the function's memory cap.
pub async fn instantiate_once(engine: &Engine, function: &Function) -> Result<(), Fault> {
    if let Some(instances) = &function.instances {
        return instances.instantiate_once().await;
    }
    let limits = function.config.limits;
    let classify = |e: wasmtime::Error| Fault::classify(e, limits.timeout);
    match function.prepared.as_ref() {
        Prepared::Module(pre) => {
            let ctx = wasi_builder(&function.config)
                .map_err(|e| Fault::Host(format!("{e:#}")))?
                .build_p1();
            let mut store = new_store(
                engine,
                GuestState::p1(ctx, limits.memory_bytes),
                limits.timeout,
            );
            pre.instantiate_async(&mut store).await.map_err(classify)?;
        }
        Prepared::Component(_) => {
            let (proxy, mut store) = proxy_store(engine, function)?;
            proxy
                .instantiate_async(&mut store)
                .await
                .map_err(classify)?;
        }
    }
    Ok(())
}

/// CGI/1.1 meta-variables (RFC 3875) for `request` routed by `route`.
fn cgi_environment(route: &str, request: &Request<Bytes>) -> Vec<(String, String)> {
    let uri = request.uri();
    let path = uri.path();
    let script = route.trim_end_matches('/');
    let mut env = vec![
        ("GATEWAY_INTERFACE".into(), "CGI/1.1".into()),
        (
            "SERVER_SOFTWARE".into(),
            concat!("edged/", env!("CARGO_PKG_VERSION")).into(),
        ),
        ("SERVER_PROTOCOL".into(), format!("{:?}", request.version())),
        ("REQUEST_METHOD".into(), request.method().to_string()),
        (
            "REQUEST_URI".into(),
            uri.path_and_query()
                .map(|p| p.to_string())
                .unwrap_or_default(),
        ),
        ("SCRIPT_NAME".into(), script.to_string()),
        (
            "PATH_INFO".into(),
            path.strip_prefix(script).unwrap_or(path).to_string(),
        ),
        (
            "QUERY_STRING".into(),
            uri.query().unwrap_or_default().to_string(),
        ),
        ("CONTENT_LENGTH".into(), request.body().len().to_string()),
    ];
    for (name, value) in request.headers() {
        let Ok(value) = value.to_str() else { continue };
        if name == http::header::CONTENT_TYPE {
            env.push(("CONTENT_TYPE".into(), value.to_string()));
            continue;
        }
        let key = format!(
            "HTTP_{}",
            name.as_str().to_ascii_uppercase().replace('-', "_")
        );
        env.push((key, value.to_string()));
    }
    env
}

/// Splits CGI output into status, headers and body. Output without a header block is all body.
fn parse_cgi_output(output: Bytes) -> Response<ResponseBody> {
    let split = find_header_end(&output);
    let mut status = StatusCode::OK;
    let mut headers = HeaderMap::new();
    let body = match split {
        Some((head_end, body_start)) => {
            let head = String::from_utf8_lossy(&output[..head_end]).into_owned();
            let mut parsed = Vec::new();
            let mut valid = true;
            for line in head.lines().filter(|l| !l.is_empty()) {
                match line.split_once(':') {
                    Some((name, value)) => {
                        parsed.push((name.trim().to_string(), value.trim().to_string()))
                    }
                    None => valid = false,
                }
            }
            if valid && !parsed.is_empty() {
                for (name, value) in parsed {
                    if name.eq_ignore_ascii_case("status") {
                        let code = value.split_whitespace().next().unwrap_or_default();
                        status = code
                            .parse::<u16>()
                            .ok()
                            .and_then(|c| StatusCode::from_u16(c).ok())
                            .unwrap_or(StatusCode::BAD_GATEWAY);
                    } else if let (Ok(n), Ok(v)) = (
                        HeaderName::try_from(name.as_str()),
                        HeaderValue::try_from(value.as_str()),
                    ) {
                        headers.append(n, v);
                    }
                }
                output.slice(body_start..)
            } else {
                output
            }
        }
        None => output,
    };
    if !headers.contains_key(http::header::CONTENT_TYPE) {
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
    }
    let mut response = Response::new(full_body(body));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

/// End of the header block and start of the body: `\r\n\r\n` or `\n\n`.
fn find_header_end(output: &[u8]) -> Option<(usize, usize)> {
    let crlf = output
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, i + 4));
    let lf = output
        .windows(2)
        .position(|w| w == b"\n\n")
        .map(|i| (i, i + 2));
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

type GuestRun = std::pin::Pin<Box<dyn Future<Output = Option<Fault>> + Send>>;

/// Runs a `wasi:http/proxy` component for one request. The guest runs inline in the request's
/// task until it has answered and finished its body (the common case: no task spawn, no
/// cross-thread hand-off); a guest that streams past that point, or keeps running after its
/// answer, continues on `tracker` so a drain waits for it. `on_done` runs exactly once, when the
/// guest ends, with its fault if any.
pub async fn run_proxy(
    engine: &Engine,
    function: &Function,
    request: Request<Bytes>,
    timing: &mut Timing,
    on_done: impl FnOnce(Option<Fault>) + Send + 'static,
    tracker: &TaskTracker,
) -> Result<Response<ResponseBody>, Fault> {
    // Created first, so that a request refused before its guest starts still reports its fault.
    let done = DoneGuard(Some(on_done));
    let limits = function.config.limits;
    let (proxy, mut store) = match proxy_store(engine, function) {
        Ok(ready) => ready,
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
        done.finish(fault.clone());
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
    if let Ok(elapsed) = instantiated_rx.try_recv() {
        timing.instantiate = elapsed;
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

/// Calls `on_done` once: with the guest's outcome, or with `None` if the guest is dropped
/// before it ends (the client went away while it ran inline; wasmtime unwinds the call).
struct DoneGuard<F: FnOnce(Option<Fault>)>(Option<F>);

impl<F: FnOnce(Option<Fault>)> DoneGuard<F> {
    fn finish(mut self, fault: Option<Fault>) {
        if let Some(on_done) = self.0.take() {
            on_done(fault);
        }
    }

    /// Ends the request with `fault` before its guest ran; returns it for the caller.
    fn fail(self, fault: Fault) -> Fault {
        self.finish(Some(fault.clone()));
        fault
    }
}

impl<F: FnOnce(Option<Fault>)> Drop for DoneGuard<F> {
    fn drop(&mut self) {
        if let Some(on_done) = self.0.take() {
            on_done(None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn cgi_output_with_status_and_headers() {
        let out = Bytes::from_static(
            b"Status: 404 Not Found\r\nContent-Type: text/plain\r\nX-A: b\r\n\r\nmissing",
        );
        let response = parse_cgi_output(out);
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert_eq!(response.headers()["x-a"], "b");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "missing");
    }

    #[tokio::test]
    async fn cgi_output_without_headers_is_body() {
        let response = parse_cgi_output(Bytes::from_static(b"just text\n\nmore"));
        assert_eq!(response.status(), StatusCode::OK);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "just text\n\nmore");
    }
}
