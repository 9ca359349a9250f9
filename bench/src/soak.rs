//! The soak phase: a real `edged` under sustained load for minutes, hello beside the fault
//! guests (a deadline-bound infinite loop, a memory bomb, a trap, a stack overflow), to show that
//! faults cost only their own requests and that the node does not grow.
//!
//! Most connections ask hello (every answer must be a 200); the rest cycle through the fault
//! guests (every answer must be the fault's 5xx). The daemon's RSS is sampled throughout; after a
//! warm-up it must stay flat. Reported: hello latency over the whole soak, request and error
//! counts, throughput, and the RSS range after warm-up with its spread as a ratio.

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

use crate::process::EdgedProcess;
use crate::report::{Figure, Ratio};
use crate::stats::{Summary, summarize};

pub struct Params {
    pub edged: std::path::PathBuf,
    pub connections: usize,
    pub duration: Duration,
    pub warm_up: Duration,
    /// Command prefix that runs `edged` (an emulator), or empty.
    pub emulator: Vec<String>,
}

/// Fault guests and the status each must answer with.
const FAULTS: [(&str, &str, u16); 4] = [
    ("loop", "infinite-loop.wat", 504),
    ("bomb", "memory-bomb.wat", 500),
    ("trap", "trap.wat", 500),
    ("recursion", "deep-recursion.wat", 500),
];

/// One in this many connections cycles through the fault guests.
const FAULT_SHARE: usize = 8;

fn start_edged(params: &Params, work: &Path) -> Result<EdgedProcess> {
    use std::fmt::Write as _;
    let mut config = format!(
        "[node]\nstate_dir = {:?}\nhttp_listen = \"127.0.0.1:0\"\n\n\
         [[function]]\nname = \"hello\"\nroute = \"/hello\"\nwasm = {:?}\n\
         [function.limits]\nmax_concurrency = 256\n",
        work.join("soak-state").display().to_string(),
        edged_testkit::guest("hello-http.wasm")
            .display()
            .to_string()
    );
    for (name, file, _) in FAULTS {
        let _ = write!(
            config,
            "\n[[function]]\nname = \"{name}\"\nroute = \"/{name}\"\nwasm = {:?}\n\
             [function.limits]\nmax_concurrency = 64\nmemory_mib = 32\ntimeout_ms = 50\n",
            edged_testkit::guest(file).display().to_string()
        );
    }
    let config_path = work.join("soak.toml");
    std::fs::write(&config_path, config)?;
    // Every fault is a warning line: thousands of them go to a file, not the terminal.
    let log = std::fs::File::create(work.join("soak-edged.log"))?;
    EdgedProcess::start(
        &params.emulator,
        &params.edged,
        &config_path,
        Stdio::from(log),
    )
}

#[derive(Default)]
struct Counts {
    hello: AtomicU64,
    hello_errors: AtomicU64,
    faults: AtomicU64,
    fault_surprises: AtomicU64,
    /// Every unexpected answer by path and status (`None`: the connection failed).
    surprises: std::sync::Mutex<std::collections::BTreeMap<(String, Option<u16>), u64>>,
}

/// One keep-alive connection asking `paths` in turn until `stop`; a connection that breaks is
/// reopened (and counted as an error on the request it broke).
async fn client(
    addr: std::net::SocketAddr,
    paths: Vec<(&'static str, u16)>,
    stop: Arc<AtomicBool>,
    counts: Arc<Counts>,
) -> Vec<Duration> {
    let mut samples = Vec::new();
    let mut turn = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let Ok(stream) = tokio::net::TcpStream::connect(addr).await else {
            counts.hello_errors.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let Ok((mut sender, conn)) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
        else {
            continue;
        };
        tokio::spawn(conn);
        while !stop.load(Ordering::Relaxed) {
            let (path, expected) = paths[turn % paths.len()];
            turn += 1;
            let request = http::Request::get(path)
                .header(http::header::HOST, "localhost")
                .body(Empty::<Bytes>::new())
                .expect("a static request");
            let started = Instant::now();
            let outcome = match sender.send_request(request).await {
                Ok(response) => {
                    let status = response.status().as_u16();
                    response.into_body().collect().await.ok().map(|_| status)
                }
                Err(_) => None,
            };
            let is_hello = path == "/hello";
            // Every tenth hello latency is kept: minutes at thousands of requests a second.
            if is_hello && turn.is_multiple_of(10) {
                samples.push(started.elapsed());
            }
            let (count, errors) = if is_hello {
                (&counts.hello, &counts.hello_errors)
            } else {
                (&counts.faults, &counts.fault_surprises)
            };
            count.fetch_add(1, Ordering::Relaxed);
            if outcome != Some(expected) {
                errors.fetch_add(1, Ordering::Relaxed);
                *counts
                    .surprises
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry((path.to_string(), outcome))
                    .or_default() += 1;
            }
            if outcome.is_none() {
                break; // reconnect
            }
        }
    }
    samples
}

fn rss_mib(pid: u32) -> Option<f64> {
    crate::process::rss_kib(pid).map(|kib| kib as f64 / 1024.0)
}

pub async fn run(params: &Params, work: &Path) -> Result<(Vec<Summary>, Vec<Ratio>, Vec<Figure>)> {
    let edged = start_edged(params, work)?;
    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Counts::default());
    let mut clients = Vec::new();
    for i in 0..params.connections {
        let paths = if i % FAULT_SHARE == FAULT_SHARE - 1 {
            FAULTS
                .iter()
                .map(|(name, _, status)| {
                    let path: &'static str = Box::leak(format!("/{name}").into_boxed_str());
                    (path, *status)
                })
                .collect()
        } else {
            vec![("/hello", 200)]
        };
        clients.push(tokio::spawn(client(
            edged.http,
            paths,
            stop.clone(),
            counts.clone(),
        )));
    }
    let started = Instant::now();
    let mut rss = Vec::new();
    eprintln!(
        "soak: {} connections for {:?} (hello + {} fault guests)…",
        params.connections,
        params.duration,
        FAULTS.len()
    );
    while started.elapsed() < params.duration {
        tokio::time::sleep(Duration::from_secs(5)).await;
        if let Some(mib) = rss_mib(edged.pid()) {
            rss.push((started.elapsed(), mib));
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut samples = Vec::new();
    for client in clients {
        samples.extend(client.await?);
    }
    let elapsed = started.elapsed();
    let settled: Vec<f64> = rss
        .iter()
        .filter(|(at, _)| *at >= params.warm_up)
        .map(|(_, mib)| *mib)
        .collect();
    let (low, high) = settled
        .iter()
        .fold((f64::MAX, 0.0f64), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
    let hello = counts.hello.load(Ordering::Relaxed);
    let hello_errors = counts.hello_errors.load(Ordering::Relaxed);
    let faults = counts.faults.load(Ordering::Relaxed);
    let surprises = counts.fault_surprises.load(Ordering::Relaxed);
    let figure = |name: &str, value: f64, unit: &str| Figure {
        name: format!("soak: {name}"),
        value,
        unit: unit.into(),
    };
    let mut figures = vec![
        figure("hello requests", hello as f64, "requests"),
        figure("hello errors (not 200)", hello_errors as f64, "requests"),
        figure("fault-guest requests", faults as f64, "requests"),
        figure(
            "fault-guest answers other than the fault's 5xx",
            surprises as f64,
            "requests",
        ),
        figure(
            &format!("throughput ({} connections)", params.connections),
            (hello + faults) as f64 / elapsed.as_secs_f64(),
            "req/s",
        ),
    ];
    for ((path, status), n) in counts
        .surprises
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
    {
        let status = status.map_or("no answer".to_string(), |s| s.to_string());
        figures.push(figure(
            &format!("unexpected answers from {path}: {status}"),
            *n as f64,
            "requests",
        ));
    }
    if !settled.is_empty() {
        figures.push(figure("RSS after warm-up, lowest", low, "MiB"));
        figures.push(figure("RSS after warm-up, highest", high, "MiB"));
    }
    let ratios = vec![
        Ratio::new(
            "soak: hello errors / hello requests",
            hello_errors as f64 / hello.max(1) as f64,
            "== 0",
            |v| v == 0.0,
        ),
        Ratio::new(
            "soak: RSS spread after warm-up (highest / lowest - 1)",
            if settled.is_empty() {
                f64::NAN
            } else {
                high / low - 1.0
            },
            "<= 0.10",
            |v| v <= 0.10,
        ),
    ];
    let phases = if samples.is_empty() {
        Vec::new()
    } else {
        vec![summarize("soak: hello under sustained load", &samples)]
    };
    Ok((phases, ratios, figures))
}
