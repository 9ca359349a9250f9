//! HTTP ingress: the hyper connection for each accepted socket, the node's own endpoints
//! (`/metrics`, `/healthz`, `/readyz`), routing by path prefix and host, and handing routed
//! requests to the serving core. Every response carries an `x-request-id`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use prometheus_client::registry::Registry;
use tokio::net::TcpStream;
use tracing::Instrument;

use crate::invoke::{ResponseBody, full_body, text_response};
use crate::metrics;
use crate::serving::Serving;

pub struct Ingress {
    serving: Arc<Serving>,
    registry: Arc<Registry>,
    /// `/readyz` answers 200 only while this is set (cleared on drain).
    ready: Arc<AtomicBool>,
    request_seq: AtomicU64,
}

impl Ingress {
    pub fn new(
        serving: Arc<Serving>,
        registry: Arc<Registry>,
        ready: Arc<AtomicBool>,
    ) -> Arc<Self> {
        Arc::new(Ingress {
            serving,
            registry,
            ready,
            request_seq: AtomicU64::new(0),
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
        let ingress = self.clone();
        let service = hyper::service::service_fn(move |req| {
            let ingress = ingress.clone();
            async move { Ok::<_, Infallible>(ingress.handle(req, peer).await) }
        });
        let conn = hyper::server::conn::http1::Builder::new()
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
        let mut response = self.dispatch(request).instrument(span).await;
        if let Ok(value) = HeaderValue::from_str(&id.to_string()) {
            response.headers_mut().insert("x-request-id", value);
        }
        response
    }

    async fn dispatch(&self, request: Request<Incoming>) -> Response<ResponseBody> {
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
}
