//! HTTP ingress: the hyper connection for each accepted socket (with a deadline for the request
//! head), the node's own endpoints (`/metrics`, `/healthz`, `/readyz`), routing by path prefix
//! and host, and handing routed requests to the serving core. Every response carries an
//! `x-request-id`.
//!
//! Requests without a Host header follow one rule: HTTP/1.1 requires Host (RFC 9112 §3.2), so
//! such a request gets a 400; an HTTP/1.0 request is served with the address it arrived on as
//! its authority (guests need one). Both are logged and counted in
//! `edged_requests_without_host_total{outcome}`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http::{HeaderValue, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::net::TcpStream;
use tracing::Instrument;

use crate::body::{ResponseBody, full_body, text_response};
use crate::metrics::{self, OutcomeLabel};
use crate::serving::Serving;

pub struct Ingress {
    serving: Arc<Serving>,
    registry: Arc<Registry>,
    /// `/readyz` answers 200 only while this is set (cleared on drain).
    ready: Arc<AtomicBool>,
    request_seq: AtomicU64,
    without_host: Family<OutcomeLabel, Counter>,
}

impl Ingress {
    /// The ingress registers its own metrics in `registry`, the last part to do so, and serves
    /// the whole registry at `/metrics` from then on.
    pub fn new(serving: Arc<Serving>, mut registry: Registry, ready: Arc<AtomicBool>) -> Arc<Self> {
        let without_host = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "requests_without_host",
            "Requests that came without a Host header, by outcome (refused: HTTP/1.1, served: HTTP/1.0)",
            without_host.clone(),
        );
        Arc::new(Ingress {
            serving,
            registry: Arc::new(registry),
            ready,
            request_seq: AtomicU64::new(0),
            without_host,
        })
    }

    /// Serves HTTP/1.1 on an accepted connection until it closes; `graceful` lets a drain wait
    /// for it.
    pub fn serve_connection(
        self: &Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        graceful: &GracefulShutdown,
    ) {
        // Responses are often several small writes (head, chunks, trailer); Nagle plus delayed
        // ACKs would add ~40 ms to each.
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(%peer, error = %e, "set_nodelay failed");
        }
        let local = match stream.local_addr() {
            Ok(local) => local,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "connection gone before it was served");
                return;
            }
        };
        let ingress = self.clone();
        let service = hyper::service::service_fn(move |req| {
            let ingress = ingress.clone();
            async move { Ok::<_, Infallible>(ingress.handle(req, peer, local).await) }
        });
        // A client that stalls half-way through a request head is disconnected.
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(self.serving.config().head_timeout)
            .keep_alive(true)
            .serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended with error");
            }
        });
    }

    /// One HTTP request, start to finish. Never fails: every problem is a status code.
    async fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> Response<ResponseBody> {
        let id = self.request_seq.fetch_add(1, Ordering::Relaxed) + 1;
        let span = tracing::info_span!(
            "request",
            id,
            %peer,
            method = %request.method(),
            path = %request.uri().path(),
            function = tracing::field::Empty,
        );
        let mut response = self.dispatch(request, local).instrument(span).await;
        if let Ok(value) = HeaderValue::from_str(&id.to_string()) {
            response.headers_mut().insert("x-request-id", value);
        }
        response
    }

    async fn dispatch(
        &self,
        mut request: Request<Incoming>,
        local: SocketAddr,
    ) -> Response<ResponseBody> {
        match request.uri().path() {
            "/metrics" => {
                let mut response = Response::new(full_body(metrics::encode(&self.registry)));
                response.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                return response;
            }
            "/healthz" => return text_response(StatusCode::OK, "ok\n"),
            "/readyz" => {
                return if self.ready.load(Ordering::SeqCst) {
                    text_response(StatusCode::OK, "ready\n")
                } else {
                    text_response(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                };
            }
            _ => {}
        }
        if !request.headers().contains_key(http::header::HOST)
            && request.uri().authority().is_none()
            && let Some(refusal) = self.without_host(&mut request, local)
        {
            return refusal;
        }
        let host = request
            .headers()
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(|h| h.rsplit_once(':').map_or(h, |(name, _)| name).to_string());
        let Some(function) = self
            .serving
            .functions()
            .route(host.as_deref(), request.uri().path())
        else {
            return text_response(StatusCode::NOT_FOUND, "no function serves this path\n");
        };
        tracing::Span::current().record("function", function.config.name.as_str());
        self.serving.serve(&function, request).await
    }

    /// The Host rule for a request that has none (see the module doc): the 400 to answer, or
    /// `None` after giving an HTTP/1.0 request the address it arrived on.
    fn without_host(
        &self,
        request: &mut Request<Incoming>,
        local: SocketAddr,
    ) -> Option<Response<ResponseBody>> {
        if request.version() >= Version::HTTP_11 {
            tracing::info!(path = %request.uri().path(), "refused: HTTP/1.1 request without a Host header");
            self.without_host
                .get_or_create(&OutcomeLabel::new("refused"))
                .inc();
            return Some(text_response(
                StatusCode::BAD_REQUEST,
                "HTTP/1.1 requests need a Host header\n",
            ));
        }
        tracing::info!(path = %request.uri().path(), authority = %local, "HTTP/1.0 request without a Host header: serving it as addressed to this listener");
        self.without_host
            .get_or_create(&OutcomeLabel::new("served"))
            .inc();
        if let Ok(value) = HeaderValue::from_str(&local.to_string()) {
            request.headers_mut().insert(http::header::HOST, value);
        }
        None
    }
}

/// What to do after the listener fails to accept, sans-IO. Running out of file descriptors
/// (EMFILE/ENFILE) fails every accept at once until one closes: without a pause the accept loop
/// spins on a core and writes millions of log lines. So each failure in a row doubles a pause
/// (1 ms up to 1 s), and the log gets one line per [`AcceptBackoff::LOG_EVERY`] with the count
/// of failures it stood for.
#[derive(Debug, Default)]
pub struct AcceptBackoff {
    pause: Duration,
    failures_unlogged: u64,
    last_logged: Option<Instant>,
}

/// The decision after one failed accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcceptPause {
    /// Wait this long before accepting again.
    pub pause: Duration,
    /// Log now, standing for this many failures (this one included); `None`: stay quiet.
    pub log: Option<u64>,
}

impl AcceptBackoff {
    const FIRST_PAUSE: Duration = Duration::from_millis(1);
    const MAX_PAUSE: Duration = Duration::from_secs(1);
    pub const LOG_EVERY: Duration = Duration::from_secs(5);

    pub fn failed(&mut self, now: Instant) -> AcceptPause {
        self.pause = (self.pause * 2).clamp(Self::FIRST_PAUSE, Self::MAX_PAUSE);
        self.failures_unlogged += 1;
        let due = self
            .last_logged
            .is_none_or(|at| now.saturating_duration_since(at) >= Self::LOG_EVERY);
        let log = due.then(|| {
            self.last_logged = Some(now);
            std::mem::take(&mut self.failures_unlogged)
        });
        AcceptPause {
            pause: self.pause,
            log,
        }
    }

    /// An accept succeeded. Returns whether it was failing before (worth a log line).
    pub fn succeeded(&mut self) -> bool {
        let was_failing = self.pause > Duration::ZERO;
        *self = AcceptBackoff {
            last_logged: self.last_logged,
            ..AcceptBackoff::default()
        };
        was_failing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failing_accepts_pause_longer_and_log_once_per_period() {
        let t0 = Instant::now();
        let mut backoff = AcceptBackoff::default();
        let first = backoff.failed(t0);
        assert_eq!(first.pause, Duration::from_millis(1));
        assert_eq!(first.log, Some(1));
        let pauses: Vec<u128> = (0..12)
            .map(|i| {
                backoff
                    .failed(t0 + Duration::from_millis(i))
                    .pause
                    .as_millis()
            })
            .collect();
        assert_eq!(
            pauses,
            [2, 4, 8, 16, 32, 64, 128, 256, 512, 1000, 1000, 1000]
        );
        // Quiet until the period is over; then one line standing for every failure since.
        let later = backoff.failed(t0 + AcceptBackoff::LOG_EVERY);
        assert_eq!(later.log, Some(13));
        assert_eq!(backoff.failed(t0 + AcceptBackoff::LOG_EVERY).log, None);
    }

    #[test]
    fn a_successful_accept_resets_the_pause() {
        let t0 = Instant::now();
        let mut backoff = AcceptBackoff::default();
        assert!(!backoff.succeeded());
        backoff.failed(t0);
        backoff.failed(t0);
        assert!(backoff.succeeded());
        assert!(!backoff.succeeded());
        let again = backoff.failed(t0 + Duration::from_secs(1));
        assert_eq!(again.pause, Duration::from_millis(1));
        // Still within the log period of the last line: quiet.
        assert_eq!(again.log, None);
    }
}
