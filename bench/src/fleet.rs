//! The fleet convergence phase: N real `edged` processes on loopback syncing with each other,
//! one large deployment pushed to the first with the real `edgectl`, and the time until every
//! other node serves it. Also what the push cost the node that got it: the bytes it served to
//! peers against one copy of the deployment's blobs, since peer sync exists so that the origin
//! uploads about one copy and the fleet spreads it from there.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

use crate::report::{Figure, Ratio};
use crate::stats::{Summary, summarize};

pub struct Params {
    pub edged: PathBuf,
    pub edgectl: PathBuf,
    pub nodes: usize,
    pub artifact_mb: usize,
    pub rounds: usize,
    /// Command prefix that runs `edged` and `edgectl` (an emulator), or empty.
    pub emulator: Vec<String>,
    /// Pooling-allocator slots for each edged, when not its default.
    pub pool_slots: Option<u32>,
}

/// How long a node may take to serve the pushed deployment before the round fails.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(180);
/// Probe interval while waiting for a node; the arrival times are this coarse.
const POLL: Duration = Duration::from_millis(20);
/// The nodes' `interval_ms`: how often each asks its peers what they hold.
const SYNC_INTERVAL: Duration = Duration::from_secs(1);
/// Goal for the origin's egress, in copies of the deployment's blobs.
const ORIGIN_EGRESS_GOAL: f64 = 1.1;

/// One running `edged` of the fleet; killed on drop.
struct Node {
    child: Child,
    info: NodeInfo,
}

/// Where a node answers and logs: what a probe task needs, without owning the process.
#[derive(Clone)]
struct NodeInfo {
    name: String,
    http: SocketAddr,
    control: SocketAddr,
    log: PathBuf,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl NodeInfo {
    fn log_tail(&self) -> String {
        tail(&self.log, 40)
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    if all.is_empty() {
        return "(empty: nothing at warn level or above)".into();
    }
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn command(emulator: &[String], binary: &Path) -> Command {
    match emulator.split_first() {
        Some((emulator, args)) => {
            let mut command = Command::new(emulator);
            command.args(args).arg(binary);
            command
        }
        None => Command::new(binary),
    }
}

/// Runs `edgectl --identity <operator> args...` to completion; its stdout, or an error with
/// its stderr.
async fn edgectl(params: &Params, operator: &Path, args: &[&str]) -> Result<String> {
    let mut command = tokio::process::Command::from(command(&params.emulator, &params.edgectl));
    let output = command
        .arg("--identity")
        .arg(operator)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| {
            format!(
                "running {} (build it with `cargo build --release -p edgectl`)",
                params.edgectl.display()
            )
        })?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        bail!(
            "edgectl {} failed ({}):\n{stdout}\n{}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(stdout)
}

/// Starts node `index` with its certificate from `<dir>/node-<index>`, syncing with `peers`
/// (control addresses), and waits until it prints both its addresses.
fn start_node(params: &Params, dir: &Path, index: usize, peers: &[SocketAddr]) -> Result<Node> {
    let name = format!("node-{index}");
    let path = |p: &str| format!("{:?}", dir.join(p).display().to_string());
    let peers: Vec<String> = peers.iter().map(|p| format!("\"{p}\"")).collect();
    let mut config = format!(
        "[node]\nstate_dir = {}\nhttp_listen = \"127.0.0.1:0\"\n\n\
         [control]\nlisten = \"127.0.0.1:0\"\nidentity_dir = {}\nnode_name = \"{name}\"\n\
         trusted_keys = [{}]\n\n\
         [sync]\npeers = [{}]\ninterval_ms = {}\n",
        path(&format!("state-{index}")),
        path(&name),
        path("operator/signing.pub"),
        peers.join(", "),
        SYNC_INTERVAL.as_millis(),
    );
    if let Some(slots) = params.pool_slots {
        let _ = write!(
            config,
            "\n[engine]\ntotal_instances = {slots}\ntotal_memories = {slots}\n"
        );
    }
    let config_path = dir.join(format!("{name}.toml"));
    std::fs::write(&config_path, config)?;
    let log = dir.join(format!("{name}.log"));
    let mut child = command(&params.emulator, &params.edged)
        .arg("--config")
        .arg(&config_path)
        .env("EDGED_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .with_context(|| {
            format!(
                "starting {} (build it with `cargo build --release -p edged`)",
                params.edged.display()
            )
        })?;
    let stdout = child.stdout.take().context("edged stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    // Keeps draining stdout after the addresses so edged never blocks on a full pipe.
    std::thread::spawn(move || {
        use std::io::BufRead;
        let mut control = None;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(addr) = line.strip_prefix("edged control on quic://") {
                control = Some(addr.to_string());
            }
            if let Some(addr) = line.strip_prefix("edged listening on http://") {
                let _ = tx.send((control.take(), addr.to_string()));
            }
        }
    });
    // The node owns the child from here, so an error below still kills it.
    let mut node = Node {
        child,
        info: NodeInfo {
            name,
            http: ([127, 0, 0, 1], 0).into(),
            control: ([127, 0, 0, 1], 0).into(),
            log,
        },
    };
    let info = &mut node.info;
    // Generous: under an emulator a start takes a while.
    let (control, http) = rx.recv_timeout(Duration::from_secs(300)).map_err(|_| {
        anyhow::anyhow!(
            "{} did not report its addresses; log tail:\n{}",
            info.name,
            info.log_tail()
        )
    })?;
    let control = control.with_context(|| {
        format!(
            "{} printed no control address (is its [control] table refused?); log tail:\n{}",
            info.name,
            info.log_tail()
        )
    })?;
    info.control = control.parse()?;
    info.http = http.parse()?;
    Ok(node)
}

/// One HTTP/1.1 GET on a fresh connection: status and body.
async fn get(addr: SocketAddr, path: &str) -> Result<(u16, Bytes)> {
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let request = http::Request::get(path)
            .header(http::header::HOST, "localhost")
            .body(Empty::<Bytes>::new())?;
        let response = sender.send_request(request).await?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, body))
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .with_context(|| format!("GET http://{addr}{path} timed out"))?
}

/// The sum of every sample of counter `name` (all label sets) in Prometheus text; `None` when it
/// has no sample.
fn counter(metrics: &str, name: &str) -> Option<f64> {
    let values: Vec<f64> = metrics
        .lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

async fn node_counter(node: &NodeInfo, name: &str) -> Result<Option<f64>> {
    let (status, body) = get(node.http, "/metrics").await?;
    if status != 200 {
        bail!("{}: /metrics answered {status}", node.name);
    }
    Ok(counter(&String::from_utf8_lossy(&body), name))
}

/// Polls `node` until `/big` answers 200; the time from `started`.
async fn wait_for_arrival(node: NodeInfo, started: Instant) -> Result<Duration> {
    loop {
        let last = match get(node.http, "/big").await {
            Ok((200, _)) => return Ok(started.elapsed()),
            Ok((status, body)) => format!("{status} {}", String::from_utf8_lossy(&body).trim()),
            Err(e) => format!("{e:#}"),
        };
        if started.elapsed() > CONVERGE_TIMEOUT {
            // Its sync counters say whether it saw peers and fetched anything at all; a warn-level
            // log is often silent about that.
            let sync_metrics = match get(node.http, "/metrics").await {
                Ok((_, body)) => String::from_utf8_lossy(&body)
                    .lines()
                    .filter(|l| l.starts_with("edged_sync_"))
                    .collect::<Vec<_>>()
                    .join("\n"),
                Err(e) => format!("(no /metrics: {e:#})"),
            };
            bail!(
                "{} (http {}, control {}) did not serve /big within {CONVERGE_TIMEOUT:?} of the \
                 push (last answer: {last})\nits sync metrics:\n{sync_metrics}\ntail of {}:\n{}",
                node.name,
                node.http,
                node.control,
                node.log.display(),
                node.log_tail()
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// What one round measured.
struct Round {
    /// Per non-origin node, from the end of the push until it served the deployment.
    arrivals: Vec<(String, Duration)>,
    /// Source plus artifact: one copy of what every node needs.
    blob_bytes: f64,
    /// Blob bytes each node served to peers (Bao slices: content plus the hash tree), the
    /// origin first.
    served: Vec<f64>,
    push_mb_per_s: Option<f64>,
}

impl Round {
    fn convergence(&self) -> Duration {
        self.arrivals.iter().map(|a| a.1).max().unwrap_or_default()
    }

    fn first(&self) -> Duration {
        self.arrivals.iter().map(|a| a.1).min().unwrap_or_default()
    }

    fn origin_multiple(&self) -> f64 {
        self.served[0] / self.blob_bytes
    }

    fn fleet_multiple(&self) -> f64 {
        self.served.iter().sum::<f64>() / (self.blob_bytes * self.arrivals.len() as f64)
    }
}

async fn round(params: &Params, work: &Path, index: usize) -> Result<Round> {
    // Fresh identities and state every round; the nodes are declared after the directory so they
    // die before it is removed.
    let round_dir = tempfile::Builder::new()
        .prefix(&format!("sync-round-{index}-"))
        .tempdir_in(work)?;
    let dir = round_dir.path();
    let operator = dir.join("operator");
    edgectl(params, &operator, &["init"]).await?;
    for i in 0..params.nodes {
        let out = dir.join(format!("node-{i}"));
        let out = out.to_str().context("non-UTF-8 temp path")?;
        edgectl(
            params,
            &operator,
            &["issue-node", &format!("node-{i}"), "--out", out],
        )
        .await?;
    }

    // Each node knows the ones started before it; those learn of it when it connects.
    let mut nodes: Vec<Node> = Vec::with_capacity(params.nodes);
    for i in 0..params.nodes {
        let peers: Vec<SocketAddr> = nodes.iter().map(|n| n.info.control).collect();
        nodes.push(start_node(params, dir, i, &peers)?);
    }

    // A different seed per round: nothing from an earlier round could be deduplicated anyway
    // (fresh stores), but identical rounds would hide a content-dependent cost.
    let wasm = dir.join("big.wasm");
    std::fs::write(
        &wasm,
        edged_testkit::big_module(params.artifact_mb << 20, 0x5eed + index as u64),
    )?;
    let origin = &nodes[0].info;
    let target = match std::env::consts::ARCH {
        "aarch64" => "aarch64",
        _ => "x86_64",
    };
    let pushed = edgectl(
        params,
        &operator,
        &[
            "--node",
            &origin.control.to_string(),
            "--json",
            "push",
            wasm.to_str().context("non-UTF-8 temp path")?,
            "--name",
            "big",
            "--target",
            target,
        ],
    )
    .await?;
    // The push is done (committed and active on the origin) when edgectl exits.
    let started = Instant::now();
    let report: serde_json::Value = pushed
        .lines()
        .rev()
        .find_map(|line| serde_json::from_str(line.trim()).ok())
        .with_context(|| format!("edgectl push printed no JSON report:\n{pushed}"))?;
    println!("  push report: {report}");

    // Every other node is polled by its own task, so one slow answer does not delay another's
    // time. The first failure ends the round; dropping the set stops the other probes.
    let mut waits = tokio::task::JoinSet::new();
    for (i, node) in nodes.iter().enumerate().skip(1) {
        let info = node.info.clone();
        waits.spawn(async move {
            let name = info.name.clone();
            anyhow::Ok((i, name, wait_for_arrival(info, started).await?))
        });
    }
    let mut arrivals = Vec::with_capacity(nodes.len() - 1);
    while let Some(arrival) = waits.join_next().await {
        arrivals.push(arrival??);
    }
    arrivals.sort_by_key(|a| a.0);
    let arrivals = arrivals.into_iter().map(|(_, name, t)| (name, t)).collect();

    // A fetch another node started in the same sync round as the last arrival would still be
    // counted by the origin a moment later: let one interval pass so it lands in the figure.
    tokio::time::sleep(SYNC_INTERVAL).await;
    let counter = "edged_sync_served_bytes_total";
    let mut served = Vec::with_capacity(nodes.len());
    for node in nodes.iter().map(|n| &n.info) {
        served.push(
            node_counter(node, counter)
                .await?
                .with_context(|| format!("{}'s /metrics has no {counter}", node.name))?,
        );
    }
    // The push report counts what edgectl sent the origin: all of source and artifact, as its
    // store was empty.
    let blob_bytes = ["sent_bytes", "resumed_bytes"]
        .iter()
        .filter_map(|k| report[k].as_f64())
        .sum::<f64>();
    if blob_bytes <= 0.0 {
        bail!("push report has no sent_bytes: {report}");
    }
    Ok(Round {
        arrivals,
        blob_bytes,
        served,
        push_mb_per_s: report["mb_per_s"].as_f64(),
    })
}

pub async fn run(params: &Params, work: &Path) -> Result<(Vec<Summary>, Vec<Ratio>, Vec<Figure>)> {
    if params.nodes < 2 {
        bail!("--nodes must be at least 2 (one to push to, one to sync)");
    }
    if params.rounds == 0 {
        bail!("--sync-rounds must be at least 1");
    }
    let mut rounds = Vec::with_capacity(params.rounds);
    for index in 0..params.rounds {
        println!(
            "sync round {}/{}: {} nodes, {} MiB module",
            index + 1,
            params.rounds,
            params.nodes,
            params.artifact_mb
        );
        let round = round(params, work, index)
            .await
            .with_context(|| format!("sync round {}", index + 1))?;
        let arrivals: Vec<String> = round
            .arrivals
            .iter()
            .map(|(name, t)| format!("{name} {:.2} s", t.as_secs_f64()))
            .collect();
        let served: Vec<String> = round
            .served
            .iter()
            .enumerate()
            .map(|(i, bytes)| format!("node-{i} {:.2}", bytes / round.blob_bytes))
            .collect();
        println!(
            "  arrivals after the push: {}\n  served to peers, in copies of the blobs ({:.1} MiB): \
             {}; origin {:.2}×, fleet {:.2}× per syncing node",
            arrivals.join(", "),
            round.blob_bytes / f64::from(1 << 20),
            served.join(", "),
            round.origin_multiple(),
            round.fleet_multiple(),
        );
        rounds.push(round);
    }

    let label = format!("({} nodes, {} MiB)", params.nodes, params.artifact_mb);
    let convergence: Vec<Duration> = rounds.iter().map(Round::convergence).collect();
    let first: Vec<Duration> = rounds.iter().map(Round::first).collect();
    let every: Vec<Duration> = rounds
        .iter()
        .flat_map(|r| r.arrivals.iter().map(|a| a.1))
        .collect();
    let phases = vec![
        summarize(&format!("sync convergence {label}"), &convergence),
        summarize("sync first node", &first),
        summarize("sync every node", &every),
    ];

    let max = |f: fn(&Round) -> f64| rounds.iter().map(f).fold(f64::MIN, f64::max);
    let ratios = vec![Ratio::new(
        "sync: origin egress / artifact set (max over rounds)",
        max(Round::origin_multiple),
        &format!("<= {ORIGIN_EGRESS_GOAL}"),
        |v| v <= ORIGIN_EGRESS_GOAL,
    )];

    let mut figures = vec![
        Figure {
            name: format!("sync: convergence p50 {label}"),
            value: phases[0].p50_us / 1e3,
            unit: "ms".into(),
        },
        // In percent: the table prints figures to one decimal, too coarse for a multiple near 1.
        Figure {
            name: "sync: fleet egress per syncing node, max".into(),
            value: max(Round::fleet_multiple) * 100.0,
            unit: "% of the artifact set".into(),
        },
    ];
    let mut rates: Vec<f64> = rounds.iter().filter_map(|r| r.push_mb_per_s).collect();
    if !rates.is_empty() {
        rates.sort_by(f64::total_cmp);
        figures.push(Figure {
            name: "sync: push to the origin, median".into(),
            value: rates[rates.len() / 2],
            unit: "MB/s".into(),
        });
    }
    Ok((phases, ratios, figures))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_sum_their_label_sets_and_only_their_own_name() {
        let text = "# HELP edged_sync_fetched_bytes Blob bytes fetched.\n\
                    # TYPE edged_sync_fetched_bytes counter\n\
                    edged_sync_fetched_bytes_total{peer=\"127.0.0.1:1\"} 100\n\
                    edged_sync_fetched_bytes_total{peer=\"127.0.0.1:2\"} 23\n\
                    edged_sync_served_bytes_total 7\n\
                    edged_sync_served_bytes_total_other 9\n";
        assert_eq!(counter(text, "edged_sync_fetched_bytes_total"), Some(123.0));
        assert_eq!(counter(text, "edged_sync_served_bytes_total"), Some(7.0));
        assert_eq!(counter(text, "edged_sync_uploads_total"), None);
    }

    #[test]
    fn big_module_is_valid_and_about_its_size() {
        let wasm = edged_testkit::big_module(1 << 20, 1);
        assert!(wasm.len() > 1 << 20 && wasm.len() < (1 << 20) + 100);
        wasmtime::Module::new(&wasmtime::Engine::default(), &wasm).expect("valid module");
    }
}
