//! The HTTP phase: the load generator ([`crate::load`]) against a real `edged` process on
//! loopback, and, in the same run, against two floors in this process ([`crate::floors`]):
//!
//! 1. a bare hyper hello server: what any Rust HTTP service costs on this machine;
//! 2. a bare wasmtime `wasi:http` server serving the same hello component, built the way
//!    `wasmtime serve` is (fresh store and instance per request from a `ProxyPre`) on edged's
//!    engine configuration: what instantiating and running a component per request costs at
//!    all, with none of edged's code in the way.
//!
//! Between them the two floors split the gap of `edged hello` to bare hyper: floor 2 / floor 1
//! is the price of wasmtime + `wasi:http`, edged / floor 2 is edged's own.
//!
//! And against the real `wasmtime serve` 48.0.8 (a separate process, installed by
//! `scripts/install-wasmtime-cli.sh`; skipped, saying so, when absent) on the same components,
//! both on their defaults and both with instance reuse: the p2 hello (`wasi:http@0.2`), the p3
//! hello (`wasi:http@0.3.0`), and a componentize-py hello (`scripts/build-large-guests.sh`).
//! Every target is loaded at 1 connection and at `connections`, each row's requests in
//! [`ROUNDS`] slices with the rows taking turns, so that load from elsewhere on a shared machine
//! falls on edged's rows and wasmtime serve's alike (two runs ten minutes apart, measured one
//! row after another, put edged's p3 hello at 0.68× and at 1.31× wasmtime serve's).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Result;

use crate::floors::{start_floor_server, start_real_wasmtime_serve, start_wasmtime_serve};
use crate::load::{ROUNDS, load};
use crate::process::{EdgedProcess, rss_kib};
use crate::report::{Figure, Ratio};
use crate::stats::{Summary, summarize};

pub struct Params {
    pub edged: PathBuf,
    /// The real `wasmtime` CLI for the `wasmtime serve` rows, if installed.
    pub wasmtime: Option<PathBuf>,
    pub connections: usize,
    pub requests: usize,
    /// Command prefix that runs `edged` (an emulator), or empty.
    pub emulator: Vec<String>,
    /// Pooling-allocator slots for edged, when not its default.
    pub pool_slots: Option<u32>,
}

/// A function of the edged under test: name, route, `.wasm`, and extra TOML for its table.
pub(crate) struct BenchFunction {
    pub name: &'static str,
    pub route: &'static str,
    pub wasm: PathBuf,
    pub extra: &'static str,
}

/// Requests per instance when reuse is on, for edged and `wasmtime serve` alike.
const REUSE: u32 = 1000;

pub(crate) fn start_edged(
    params: &Params,
    work: &Path,
    guests: &[BenchFunction],
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
    for f in guests {
        let _ = write!(
            config,
            "\n[[function]]\nname = \"{}\"\nroute = \"{}\"\nwasm = {:?}\n{}[function.limits]\nmax_concurrency = 256\n",
            f.name,
            f.route,
            f.wasm.display().to_string(),
            f.extra,
        );
    }
    let config_path = work.join("edged.toml");
    std::fs::write(&config_path, config)?;
    EdgedProcess::start(&params.emulator, binary, &config_path, Stdio::inherit())
}

/// One load target: a row of the report at each connection count.
struct Target {
    name: String,
    addr: SocketAddr,
    path: &'static str,
    /// Requests per measurement, scaled down for slow guests.
    requests: usize,
}

pub async fn run(params: &Params, work: &Path) -> Result<(Vec<Summary>, Vec<Ratio>, Vec<Figure>)> {
    let p2_hello = edged_testkit::guest("hello-http.wasm");
    let p3_hello = edged_testkit::guest("p3-hello.wasm");
    let python = edged_testkit::workspace_root().join("guests/out/large/python-hello.wasm");
    let python = python.exists().then_some(python);
    if python.is_none() {
        println!(
            "note: no componentize-py hello (run scripts/build-large-guests.sh): its rows are skipped"
        );
    }
    let reuse_toml: &'static str = "instances = { requests = 1000 }\n";
    let mut guests = vec![
        BenchFunction {
            name: "hello",
            route: "/hello",
            wasm: p2_hello.clone(),
            extra: "",
        },
        BenchFunction {
            name: "hello-reuse",
            route: "/hello-reuse",
            wasm: p2_hello.clone(),
            extra: reuse_toml,
        },
        BenchFunction {
            name: "p3",
            route: "/p3",
            wasm: p3_hello.clone(),
            extra: "",
        },
        BenchFunction {
            name: "heavy",
            route: "/heavy",
            wasm: edged_testkit::guest("init-heavy-http.wasm"),
            extra: "",
        },
        BenchFunction {
            name: "cgi",
            route: "/cgi",
            wasm: edged_testkit::guest("init-heavy-p1.wasm"),
            extra: "",
        },
    ];
    if let Some(python) = &python {
        guests.push(BenchFunction {
            name: "py",
            route: "/py",
            wasm: python.clone(),
            extra: "",
        });
        guests.push(BenchFunction {
            name: "py-reuse",
            route: "/py-reuse",
            wasm: python.clone(),
            extra: reuse_toml,
        });
    }
    let edged = start_edged(params, work, &guests)?;
    let floor = start_floor_server()?;
    let serve = start_wasmtime_serve(&p2_hello, params.pool_slots)?;
    // Let the node settle, then read its idle footprint with every sample function prepared.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle_rss = rss_kib(edged.pid());

    let n = params.requests;
    let target = |name: &str, addr: SocketAddr, path: &'static str, requests: usize| Target {
        name: name.to_string(),
        addr,
        path,
        requests,
    };
    let mut targets = vec![
        target("http: bare hyper floor", floor, "/", n),
        target(
            "http: in-process wasmtime p2 hello (floor 2)",
            serve.addr,
            "/",
            n,
        ),
        target("http: edged p2 hello (fresh)", edged.http, "/hello", n),
        target(
            "http: edged p2 hello (reuse)",
            edged.http,
            "/hello-reuse",
            n,
        ),
        target("http: edged p3 hello (defaults)", edged.http, "/p3", n),
        target(
            "http: edged init-heavy p2 (Wizer)",
            edged.http,
            "/heavy?key=4242",
            n,
        ),
        target(
            "http: edged init-heavy p1 CGI (Wizer)",
            edged.http,
            "/cgi?key=4242",
            n,
        ),
    ];
    if python.is_some() {
        targets.push(target(
            "http: edged python hello (fresh)",
            edged.http,
            "/py",
            n / 8,
        ));
        targets.push(target(
            "http: edged python hello (reuse)",
            edged.http,
            "/py-reuse",
            n,
        ));
    }
    // The real `wasmtime serve`, one process per configuration, all started before measuring so
    // that their rows interleave with edged's (below).
    let reuse_flag = format!("--max-instance-reuse-count={REUSE}");
    let mut real: Vec<(&str, PathBuf, Vec<String>, usize)> = Vec::new();
    match &params.wasmtime {
        Some(_) => {
            real.push((
                "http: wasmtime serve p2 hello (defaults)",
                p2_hello.clone(),
                vec![],
                n,
            ));
            real.push((
                "http: wasmtime serve p2 hello (reuse)",
                p2_hello.clone(),
                vec![reuse_flag.clone()],
                n,
            ));
            real.push((
                "http: wasmtime serve p3 hello (defaults)",
                p3_hello.clone(),
                vec![],
                n,
            ));
            if let Some(python) = &python {
                real.push((
                    "http: wasmtime serve python hello (defaults)",
                    python.clone(),
                    vec![],
                    n / 8,
                ));
                real.push((
                    "http: wasmtime serve python hello (reuse)",
                    python.clone(),
                    vec![reuse_flag.clone()],
                    n,
                ));
            }
        }
        None => println!(
            "note: the real wasmtime serve 48.0.8 is not installed (scripts/install-wasmtime-cli.sh): its rows are skipped"
        ),
    }
    let mut real_servers = Vec::new();
    if let Some(wasmtime) = &params.wasmtime {
        for (name, wasm, flags, requests) in &real {
            let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
            let server = start_real_wasmtime_serve(wasmtime, wasm, &flags).await?;
            targets.push(target(name, server.addr, "/", *requests));
            real_servers.push(server);
        }
    }

    let mut phases = Vec::new();
    let mut figures = Vec::new();
    // Requests/s by (row name, connections).
    let mut rps_of = std::collections::HashMap::new();
    let mut p50_of = std::collections::HashMap::new();
    let connection_counts = if params.connections > 1 {
        vec![1, params.connections]
    } else {
        vec![1]
    };
    // Warm-up: connections, page cache, CPU frequency, instances.
    for &connections in &connection_counts {
        for t in &targets {
            load(t.addr, t.path, connections, (connections * 20).max(40)).await?;
        }
    }
    // Every row's requests in ROUNDS slices, the rows taking turns: on a shared machine the
    // load from elsewhere drifts over minutes, and rows measured one after another would each
    // get a different share of it. A row's figures pool its slices.
    let mut pooled: Vec<Vec<(Vec<Duration>, Duration)>> =
        vec![vec![Default::default(); targets.len()]; connection_counts.len()];
    for _ in 0..ROUNDS {
        for (c, &connections) in connection_counts.iter().enumerate() {
            for (i, t) in targets.iter().enumerate() {
                let requests = (t.requests / ROUNDS).max(connections * 20);
                let (samples, rps) = load(t.addr, t.path, connections, requests).await?;
                let (all, busy) = &mut pooled[c][i];
                *busy += Duration::from_secs_f64(samples.len() as f64 / rps);
                all.extend(samples);
            }
        }
    }
    drop(real_servers);
    drop(serve);
    for (t_index, t) in targets.iter().enumerate() {
        for (c, &connections) in connection_counts.iter().enumerate() {
            let (samples, busy) = &pooled[c][t_index];
            let rps = samples.len() as f64 / busy.as_secs_f64();
            let row = format!("{} ×{connections}", t.name);
            let summary = summarize(&row, samples);
            p50_of.insert(row.clone(), summary.p50_us);
            phases.push(summary);
            rps_of.insert(row.clone(), rps);
            figures.push(Figure {
                name: format!("{row}: requests/s"),
                value: rps,
                unit: "req/s".into(),
            });
        }
    }
    if let Some(kib) = idle_rss {
        figures.push(Figure {
            name: format!(
                "edged idle RSS with the {} bench functions prepared",
                guests.len()
            ),
            value: kib as f64 / 1024.0,
            unit: "MiB".into(),
        });
    }

    let wide = params.connections;
    let p50 = |row: &str| p50_of.get(&format!("{row} ×1")).copied();
    let rps = |row: &str, c: usize| rps_of.get(&format!("{row} ×{c}")).copied();
    let mut ratios = Vec::new();
    // A ratio both of whose rows were measured (the wasmtime serve rows may be skipped).
    fn goal(name: String, value: Option<f64>, goal: &str, met: fn(f64) -> bool) -> Option<Ratio> {
        value
            .filter(|v| v.is_finite())
            .map(|value| Ratio::new(&name, value, goal, met))
    }
    let div = |a: Option<f64>, b: Option<f64>| Some(a? / b?);
    let floor = "http: bare hyper floor";
    ratios.extend(goal(
        "http p50 ×1: edged p3 hello / bare-hyper floor".into(),
        div(p50("http: edged p3 hello (defaults)"), p50(floor)),
        "<= 1.5",
        |v| v <= 1.5,
    ));
    ratios.extend(
        div(p50("http: wasmtime serve p3 hello (defaults)"), p50(floor))
            .filter(|v| v.is_finite())
            .map(|v| {
                Ratio::context(
                    "http p50 ×1: wasmtime serve p3 hello / bare-hyper floor",
                    v,
                    "the same component on wasmtime's own server: the p3 floor",
                )
            }),
    );
    ratios.extend(goal(
        "http p50 ×1: edged p2 hello / bare-hyper floor".into(),
        div(p50("http: edged p2 hello (fresh)"), p50(floor)),
        "<= 1.5",
        |v| v <= 1.5,
    ));
    ratios.extend(goal(
        "http p50 ×1: edged p2 hello / in-process wasmtime (floor 2)".into(),
        div(
            p50("http: edged p2 hello (fresh)"),
            p50("http: in-process wasmtime p2 hello (floor 2)"),
        ),
        "<= 1.2",
        |v| v <= 1.2,
    ));
    ratios.extend(goal(
        "http p50 ×1: init-heavy p2 / p2 hello".into(),
        div(
            p50("http: edged init-heavy p2 (Wizer)"),
            p50("http: edged p2 hello (fresh)"),
        ),
        "<= 2.0",
        |v| v <= 2.0,
    ));
    for c in [1, wide] {
        let vs = |edged_row: &str, serve_row: &str| div(rps(edged_row, c), rps(serve_row, c));
        ratios.extend(goal(
            format!("req/s ×{c}: edged / wasmtime serve, p2 hello, both defaults"),
            vs(
                "http: edged p2 hello (fresh)",
                "http: wasmtime serve p2 hello (defaults)",
            ),
            ">= 3",
            |v| v >= 3.0,
        ));
        ratios.extend(goal(
            format!("req/s ×{c}: edged / wasmtime serve, p2 hello, both reuse"),
            vs(
                "http: edged p2 hello (reuse)",
                "http: wasmtime serve p2 hello (reuse)",
            ),
            ">= 1.5",
            |v| v >= 1.5,
        ));
        ratios.extend(goal(
            format!("req/s ×{c}: edged / wasmtime serve, p3 hello, both defaults"),
            vs(
                "http: edged p3 hello (defaults)",
                "http: wasmtime serve p3 hello (defaults)",
            ),
            ">= 1.5",
            |v| v >= 1.5,
        ));
        ratios.extend(goal(
            format!("req/s ×{c}: edged python hello, reuse / fresh"),
            vs(
                "http: edged python hello (reuse)",
                "http: edged python hello (fresh)",
            ),
            ">= 10",
            |v| v >= 10.0,
        ));
        ratios.extend(goal(
            format!("req/s ×{c}: edged / wasmtime serve, python hello, both reuse"),
            vs(
                "http: edged python hello (reuse)",
                "http: wasmtime serve python hello (reuse)",
            ),
            ">= 1.2",
            |v| v >= 1.2,
        ));
        let name = format!("req/s ×{c}: edged / wasmtime serve, python hello, both fresh");
        ratios.extend(
            vs(
                "http: edged python hello (fresh)",
                "http: wasmtime serve python hello (defaults)",
            )
            .filter(|v| v.is_finite())
            .map(|v| {
                Ratio::context(
                    &name,
                    v,
                    "what a fresh interpreter instance costs either host",
                )
            }),
        );
    }
    Ok((phases, ratios, figures))
}
