//! The HTTP phase: a load generator (several keep-alive connections, one request in flight per
//! connection) against a real `edged` process on loopback, and, in the same run, against a bare
//! hyper hello server (the floor: what any Rust HTTP service costs on this machine).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;

use crate::report::{Figure, Ratio};
use crate::stats::{Summary, summarize};

pub struct Params {
    pub edged: PathBuf,
    pub connections: usize,
    pub requests: usize,
    /// Command prefix that runs `edged` (an emulator), or empty.
    pub emulator: Vec<String>,
    /// Pooling-allocator slots for edged, when not its default.
    pub pool_slots: Option<u32>,
}

/// A running `edged` with the sample functions; killed on drop.
struct EdgedProcess {
    child: Child,
    addr: SocketAddr,
}

impl Drop for EdgedProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_edged(
    params: &Params,
    work: &Path,
    guests: &[(&str, &str, PathBuf)],
) -> Result<EdgedProcess> {
    use std::fmt::Write as _;
    let binary = &params.edged;
    let mut config = format!(
        "[node]\nstate_dir = {:?}\nhttp_listen = \"127.0.0.1:0\"\n",
        work.join("edged-state").display().to_string()
    );
    if let Some(slots) = params.pool_slots {
        let _ = write!(
            config,
            "\n[engine]\ntotal_instances = {slots}\ntotal_memories = {slots}\n"
        );
    }
    for (name, route, wasm) in guests {
        let _ = write!(
            config,
            "\n[[function]]\nname = \"{name}\"\nroute = \"{route}\"\nwasm = {:?}\n[function.limits]\nmax_concurrency = 256\n",
            wasm.display().to_string()
        );
    }
    let config_path = work.join("edged.toml");
    std::fs::write(&config_path, config)?;
    let mut command = match params.emulator.split_first() {
        Some((emulator, emulator_args)) => {
            let mut command = Command::new(emulator);
            command.args(emulator_args).arg(binary);
            command
        }
        None => Command::new(binary),
    };
    let mut child = command
        .arg("--config")
        .arg(&config_path)
        .env("EDGED_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| {
            format!(
                "starting {} (build it with `cargo build --release -p edged`)",
                binary.display()
            )
        })?;
    let stdout = child.stdout.take().context("edged stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(addr) = line.strip_prefix("edged listening on http://") {
                let _ = tx.send(addr.to_string());
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(300))
        .context("edged did not report its address")?
        .parse()?;
    Ok(EdgedProcess { child, addr })
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches(" kB")
        .trim()
        .parse()
        .ok()
}

/// The floor: hyper answering "hello" with nothing else in the way, on its own runtime.
fn start_floor_server() -> Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("floor runtime");
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::from_static(b"hello from the floor\n"),
                        )))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
    });
    Ok(addr)
}

/// Latencies of `requests` GETs of `path`, spread over `connections` keep-alive connections,
/// and the achieved requests per second.
async fn load(
    addr: SocketAddr,
    path: &str,
    connections: usize,
    requests: usize,
) -> Result<(Vec<Duration>, f64)> {
    let per_connection = requests.div_ceil(connections);
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..connections {
        let path = path.to_string();
        workers.push(tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            let mut samples = Vec::with_capacity(per_connection);
            for _ in 0..per_connection {
                let request = http::Request::get(path.as_str())
                    .header(http::header::HOST, "localhost")
                    .body(Empty::<Bytes>::new())?;
                let start = Instant::now();
                let response = sender.send_request(request).await?;
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

pub async fn run(params: &Params, work: &Path) -> Result<(Vec<Summary>, Vec<Ratio>, Vec<Figure>)> {
    let guests = [
        ("hello", "/hello", edged_testkit::guest("hello-http.wasm")),
        (
            "heavy",
            "/heavy",
            edged_testkit::guest("init-heavy-http.wasm"),
        ),
        ("cgi", "/cgi", edged_testkit::guest("init-heavy-p1.wasm")),
    ];
    let edged = start_edged(params, work, &guests)?;
    let floor = start_floor_server()?;
    // Let the node settle, then read its idle footprint with every sample function prepared.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle_rss = rss_kib(edged.child.id());

    let targets = [
        ("http: bare hyper floor", floor, "/"),
        ("http: hello component", edged.addr, "/hello"),
        (
            "http: init-heavy component (Wizer)",
            edged.addr,
            "/heavy?key=4242",
        ),
        (
            "http: init-heavy p1 CGI (Wizer)",
            edged.addr,
            "/cgi?key=4242",
        ),
    ];
    let mut phases = Vec::new();
    let mut figures = Vec::new();
    for (name, addr, path) in targets {
        // Warm-up: connections, page cache, CPU frequency.
        load(addr, path, params.connections, params.connections * 20).await?;
        let (samples, rps) = load(addr, path, params.connections, params.requests).await?;
        phases.push(summarize(name, &samples));
        figures.push(Figure {
            name: format!("{name}: requests/s ({} connections)", params.connections),
            value: rps,
            unit: "req/s".into(),
        });
    }
    if let Some(kib) = idle_rss {
        figures.push(Figure {
            name: "edged idle RSS with the 3 sample functions prepared".into(),
            value: kib as f64 / 1024.0,
            unit: "MiB".into(),
        });
    }
    let p50 = |i: usize| phases[i].p50_us;
    let ratios = vec![
        Ratio::new(
            "http p50: hello / bare-hyper floor",
            p50(1) / p50(0),
            "<= 1.5",
            |v| v <= 1.5,
        ),
        Ratio::new(
            "http p50: init-heavy component / hello",
            p50(2) / p50(1),
            "<= 2.0",
            |v| v <= 2.0,
        ),
        Ratio::new(
            "http p50: init-heavy p1 CGI / hello",
            p50(3) / p50(1),
            "info",
            |_| true,
        ),
    ];
    Ok((phases, ratios, figures))
}
