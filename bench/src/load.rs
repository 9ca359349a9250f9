//! The load generator every request-latency phase uses: GETs over several keep-alive
//! connections, one request in flight per connection, each request's latency recorded. A
//! server may close a keep-alive connection between requests (HTTP/1.1 allows it): the worker then opens a new one, the reconnect counted in that request's
//! latency as a client would pay it, and says so on stderr.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

/// Slices each row's requests are measured in, the rows taking turns.
pub(crate) const ROUNDS: usize = 4;

/// Latencies of `requests` GETs of `path`, spread over `connections` keep-alive connections,
/// and the achieved requests per second.
pub(crate) async fn load(
    addr: SocketAddr,
    path: &str,
    connections: usize,
    requests: usize,
) -> Result<(Vec<Duration>, f64)> {
    load_with(addr, path, &[], connections, requests).await
}

/// [`load`] with extra request headers (the chain phase's bearer token).
pub(crate) async fn load_with(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    connections: usize,
    requests: usize,
) -> Result<(Vec<Duration>, f64)> {
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let per_connection = requests.div_ceil(connections);
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..connections {
        let path = path.to_string();
        let headers = headers.clone();
        workers.push(tokio::spawn(async move {
            let mut sender = connect(addr).await?;
            let mut samples = Vec::with_capacity(per_connection);
            let mut reconnects = 0usize;
            for _ in 0..per_connection {
                let mut request =
                    http::Request::get(path.as_str()).header(http::header::HOST, "localhost");
                for (name, value) in &headers {
                    request = request.header(name.as_str(), value.as_str());
                }
                let request = request.body(Empty::<Bytes>::new())?;
                let start = Instant::now();
                if sender.ready().await.is_err() {
                    // Closed by the server since the last response: a new connection.
                    sender = connect(addr).await?;
                    reconnects += 1;
                }
                let response = sender
                    .send_request(request)
                    .await
                    .with_context(|| format!("GET http://{addr}{path}"))?;
                let status = response.status();
                let body = response.into_body().collect().await?.to_bytes();
                samples.push(start.elapsed());
                if !status.is_success() {
                    bail!(
                        "{path}: status {status}: {}",
                        String::from_utf8_lossy(&body)
                    );
                }
            }
            if reconnects > 0 {
                eprintln!(
                    "note: http://{addr}{path} closed {reconnects} of {per_connection} keep-alive \
                     connections between requests; each was opened again"
                );
            }
            anyhow::Ok(samples)
        }));
    }
    let mut samples = Vec::with_capacity(requests);
    for worker in workers {
        samples.extend(worker.await??);
    }
    let rps = samples.len() as f64 / started.elapsed().as_secs_f64();
    Ok((samples, rps))
}

/// A fresh HTTP/1.1 connection to `addr`, its driver spawned.
async fn connect(
    addr: SocketAddr,
) -> Result<hyper::client::conn::http1::SendRequest<Empty<Bytes>>> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}
