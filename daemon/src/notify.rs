//! systemd integration over the notify protocol (`NOTIFY_SOCKET`): READY once the store is open
//! and the listener bound, RELOADING/READY around SIGHUP, STOPPING on drain, and WATCHDOG pings
//! from a task that proves the serving path answers. Without `NOTIFY_SOCKET` every call is a
//! no-op, so the same binary runs outside systemd.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use sd_notify::NotifyState;

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}

pub fn ready() {
    send(&[NotifyState::Ready, NotifyState::Status("serving")]);
}

pub fn reloading() {
    // systemd >= 253 requires MONOTONIC_USEC with RELOADING.
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("draining")]);
}

/// Asks the node's own `/healthz` over its HTTP listener: the same accept loop and service
/// that clients use.
async fn serving_path_answers(addr: SocketAddr) -> bool {
    let probe = async {
        let stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .ok()?;
        tokio::spawn(conn);
        let request = http::Request::get("/healthz")
            .header(http::header::HOST, "localhost")
            .body(Empty::<bytes::Bytes>::new())
            .ok()?;
        let response = sender.send_request(request).await.ok()?;
        Some(response.status() == http::StatusCode::OK)
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), probe).await,
        Ok(Some(true))
    )
}

/// Pings the watchdog at half its interval while the node is ready and its HTTP path at `addr`
/// answers; stays silent otherwise, so systemd restarts a wedged daemon.
pub fn spawn_watchdog(ready: Arc<AtomicBool>, addr: SocketAddr) -> tokio::task::JoinHandle<()> {
    let interval = sd_notify::watchdog_enabled();
    tokio::spawn(async move {
        let Some(interval) = interval else { return };
        let mut tick = tokio::time::interval(interval / 2);
        loop {
            tick.tick().await;
            if ready.load(Ordering::SeqCst) && serving_path_answers(addr).await {
                send(&[NotifyState::Watchdog]);
            } else {
                tracing::error!("serving path did not answer; withholding the watchdog ping");
            }
        }
    })
}
