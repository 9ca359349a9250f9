//! A `wasi:http@0.3.0` service for the node's tests: it counts the requests its instance has
//! served in a global (so a test sees exactly when an instance is reused), and misbehaves on
//! request, one way per query:
//!
//! - (none)        `requests=N` — N counts this instance's requests, starting at 1
//! - `?trap`       counts the request, then traps (a Rust panic aborts)
//! - `?spin`       busy-loops before answering (cut by the deadline)
//! - `?hang`       never answers and never uses the CPU: waits an hour on the host clock (a
//!                 guest that awaits nothing at all is caught by wasmtime as a deadlock instead)
//! - `?linger`     answers, then keeps a task busy-looping after the answer
//! - `?alloc=MIB`  touches MIB MiB of fresh memory, then answers (hits a memory cap)
//! - `?sleep=MS`   waits MS ms on the host clock, then answers (concurrent requests interleave)
//! - `?drain=MS`   reads the whole request body, then waits MS ms, then answers `read=BYTES`
//!                 (a request whose body the instance has consumed)

use std::sync::atomic::{AtomicU64, Ordering};

use wasip3::http::types::{ErrorCode, Fields, Request, Response};
use wasip3::wit_bindgen::StreamResult;
use wasip3::{wit_bindgen, wit_future, wit_stream};

wasip3::http::service::export!(Probe);

struct Probe;

/// Requests this instance has accepted: survives between requests only if the node reuses it.
static REQUESTS: AtomicU64 = AtomicU64::new(0);

fn text_response(body: String) -> Result<Response, ErrorCode> {
    let headers = Fields::from_list(&[("content-type".to_string(), b"text/plain".to_vec())])
        .map_err(|e| ErrorCode::InternalError(Some(format!("{e:?}"))))?;
    let (mut body_tx, body_rx) = wit_stream::new();
    let (trailers_tx, trailers_rx) = wit_future::new(|| Ok(None));
    drop(trailers_tx);
    let (response, _sent) = Response::new(headers, Some(body_rx), trailers_rx);
    wit_bindgen::spawn_local(async move {
        body_tx.write_all(body.into_bytes()).await;
    });
    Ok(response)
}

fn busy_forever() -> ! {
    let mut x = 0u64;
    loop {
        x = std::hint::black_box(x.wrapping_add(1));
    }
}

impl wasip3::exports::http::handler::Guest for Probe {
    async fn handle(request: Request) -> Result<Response, ErrorCode> {
        let n = REQUESTS.fetch_add(1, Ordering::SeqCst) + 1;
        let path = request.get_path_with_query().unwrap_or_default();
        let query = path.split_once('?').map(|(_, q)| q).unwrap_or_default();
        let (action, arg) = query.split_once('=').unwrap_or((query, ""));
        match action {
            "trap" => panic!("trap requested (request {n} of this instance)"),
            "spin" => busy_forever(),
            "hang" => wasip3::clocks::monotonic_clock::wait_for(3_600 * 1_000_000_000).await,
            "linger" => {
                let response = text_response(format!("requests={n} lingering\n"));
                wit_bindgen::spawn_local(async {
                    // Let the answer go out first (the host reads the body in the store's event
                    // loop, which a spinning task blocks), then keep the instance busy.
                    wasip3::clocks::monotonic_clock::wait_for(20_000_000).await;
                    busy_forever()
                });
                return response;
            }
            "alloc" => {
                let mib: usize = arg.parse().unwrap_or(1);
                let mut block = vec![0u8; mib << 20];
                for page in block.chunks_mut(4096) {
                    page[0] = 1;
                }
                let touched: usize = block.iter().step_by(4096).map(|&b| b as usize).sum();
                return text_response(format!("requests={n} touched={touched}\n"));
            }
            "drain" => {
                let ms: u64 = arg.parse().unwrap_or(0);
                let (done_tx, done_rx) = wit_future::new(|| Ok(()));
                let (mut body, _trailers) = Request::consume_body(request, done_rx);
                let mut read = 0usize;
                let mut chunk = Vec::with_capacity(16 << 10);
                loop {
                    let (status, buf) = body.read(chunk).await;
                    chunk = buf;
                    match status {
                        StreamResult::Complete(_) => {
                            read += chunk.len();
                            chunk.clear();
                        }
                        StreamResult::Dropped | StreamResult::Cancelled => break,
                    }
                }
                let _ = done_tx.write(Ok(())).await;
                wasip3::clocks::monotonic_clock::wait_for(ms * 1_000_000).await;
                return text_response(format!("requests={n} read={read}\n"));
            }
            "sleep" => {
                let ms: u64 = arg.parse().unwrap_or(0);
                wasip3::clocks::monotonic_clock::wait_for(ms * 1_000_000).await;
            }
            _ => {}
        }
        text_response(format!("requests={n}\n"))
    }
}
