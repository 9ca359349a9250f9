//! The chain phase: what a middleware chain costs. One real `edged` on loopback serves, side
//! by side:
//!
//! 1. the p3 hello alone;
//! 2. [auth, header, hello] composed into one component (`middleware = [...]`): a hop is a
//!    function call;
//! 3. [pass, pass, hello]: two middlewares that do nothing (`p3-pass`), what the hops
//!    themselves cost in wasmtime's component-model-async runtime, apart from what the sample
//!    middlewares do;
//! 4. the same three as separate functions calling each other over loopback HTTP (the
//!    "microservices" baseline): `p3-forward` plays auth, then header, each sending the request
//!    on with `wasi:http/client` to the next function's route on the same node.
//!
//! Every request carries the bearer token, so all three answer with hello's body. Goals: the
//! chain's p50 within 1.2× of hello alone, and at least 10× faster than the baseline. Each is
//! measured at one connection (p50 is a request's latency) and at `connections` (p50 is mostly
//! the queue in front of the cores, so it weighs a request's CPU time). Two more ratios say what
//! bounds the goals: the empty hops over hello alone, and the baseline over hello alone (the
//! most the chain could beat the baseline by, were its middlewares free).

use std::fmt::Write as _;
use std::path::Path;
use std::process::Stdio;

use anyhow::{Context, Result};

use crate::load::{ROUNDS, load_with};
use crate::process::EdgedProcess;
use crate::report::{Figure, Ratio};
use crate::stats::{Summary, summarize};

pub struct Params {
    pub edged: std::path::PathBuf,
    pub connections: usize,
    pub requests: usize,
    pub emulator: Vec<String>,
    pub pool_slots: Option<u32>,
}

/// The sample auth middleware's baked-in token (guests/p3-mw).
const TOKEN: &str = "Bearer edged-sample-token";

/// A port free right now, for the node's HTTP listener: the baseline's forwarders must know
/// the node's address before it starts (their environment is in its config).
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn config(params: &Params, work: &Path, port: u16) -> String {
    let wasm = |file: &str| format!("{:?}", edged_testkit::guest(file).display().to_string());
    let mut text = format!(
        "[node]\nstate_dir = {:?}\nhttp_listen = \"127.0.0.1:{port}\"\n",
        work.join("edged-chain-state").display().to_string()
    );
    if let Some(slots) = params.pool_slots {
        let _ = write!(
            text,
            "\n[engine]\ntotal_instances = {slots}\ntotal_memories = {slots}\n"
        );
    }
    let limits = "[function.limits]\nmax_concurrency = 256\n";
    let _ = write!(
        text,
        "\n[[function]]\nname = \"hello\"\nroute = \"/hello\"\nwasm = {hello}\n{limits}\
         \n[[function]]\nname = \"chain\"\nroute = \"/chain\"\nwasm = {hello}\n\
         middleware = [{auth}, {header}]\n{limits}\
         \n[[function]]\nname = \"empty-hops\"\nroute = \"/empty-hops\"\nwasm = {hello}\n\
         middleware = [{pass}, {pass}]\n{limits}",
        hello = wasm("p3-hello.wasm"),
        auth = wasm("p3-auth.wasm"),
        header = wasm("p3-header.wasm"),
        pass = wasm("p3-pass.wasm"),
    );
    for (name, role, next) in [
        ("svc-auth", "auth", "svc-header"),
        ("svc-header", "header", "svc-hello"),
    ] {
        let _ = write!(
            text,
            "\n[[function]]\nname = \"{name}\"\nroute = \"/{name}\"\nwasm = {forward}\n\
             outbound_hosts = [\"127.0.0.1\"]\n\
             env = {{ FORWARD_ROLE = \"{role}\", FORWARD_TO = \"http://127.0.0.1:{port}/{next}\" }}\n{limits}",
            forward = wasm("p3-forward.wasm"),
        );
    }
    let _ = write!(
        text,
        "\n[[function]]\nname = \"svc-hello\"\nroute = \"/svc-hello\"\nwasm = {}\n{limits}",
        wasm("p3-hello.wasm")
    );
    text
}

pub async fn run(params: &Params, work: &Path) -> Result<(Vec<Summary>, Vec<Ratio>, Vec<Figure>)> {
    let port = free_port()?;
    let config_path = work.join("edged-chain.toml");
    std::fs::write(&config_path, config(params, work, port))?;
    let edged = EdgedProcess::start(
        &params.emulator,
        &params.edged,
        &config_path,
        Stdio::inherit(),
    )
    .context("starting edged for the chain phase")?;
    let targets = [
        ("chain: p3 hello alone", "/hello"),
        ("chain: [auth, header, hello] composed", "/chain"),
        (
            "chain: [pass, pass, hello] composed (empty hops)",
            "/empty-hops",
        ),
        (
            "chain: auth -> header -> hello over loopback HTTP",
            "/svc-auth",
        ),
    ];
    let headers = [("authorization", TOKEN)];
    let mut counts = vec![1];
    if params.connections > 1 {
        counts.push(params.connections);
    }
    let mut phases = Vec::new();
    let mut figures = Vec::new();
    let mut ratios = Vec::new();
    for &connections in &counts {
        // Warm-up: connections, instances, the forwarders' first outbound requests.
        for (_, path) in targets {
            load_with(
                edged.http,
                path,
                &headers,
                connections,
                (connections * 20).max(40),
            )
            .await?;
        }
        // The rows take turns, a slice of each row's requests at a time (see `load::ROUNDS`).
        let mut pooled: Vec<(Vec<std::time::Duration>, f64)> =
            vec![Default::default(); targets.len()];
        for _ in 0..ROUNDS {
            for (i, (_, path)) in targets.iter().enumerate() {
                let requests = (params.requests / ROUNDS).max(connections * 20);
                let (samples, rps) =
                    load_with(edged.http, path, &headers, connections, requests).await?;
                pooled[i].1 += samples.len() as f64 / rps;
                pooled[i].0.extend(samples);
            }
        }
        let mut p50 = Vec::new();
        for ((name, _), (samples, seconds)) in targets.iter().zip(&pooled) {
            let row = format!("{name} ×{connections}");
            let summary = summarize(&row, samples);
            p50.push(summary.p50_us);
            phases.push(summary);
            figures.push(Figure {
                name: format!("{row}: requests/s"),
                value: samples.len() as f64 / seconds,
                unit: "req/s".into(),
            });
        }
        let (alone, chain, empty, loopback) = (p50[0], p50[1], p50[2], p50[3]);
        // At one connection p50 is a request's latency; at several it is mostly the queue in
        // front of two busy cores, so it measures the cost of a request in CPU time.
        ratios.push(Ratio::new(
            &format!("chain p50 ×{connections}: [auth, header, hello] / hello alone"),
            chain / alone,
            "<= 1.2",
            |v| v <= 1.2,
        ));
        ratios.push(Ratio::new(
            &format!("chain p50 ×{connections}: loopback microservices / composed chain"),
            loopback / chain,
            ">= 10",
            |v| v >= 10.0,
        ));
        ratios.push(Ratio::context(
            &format!("chain p50 ×{connections}: [pass, pass, hello] / hello alone"),
            empty / alone,
            "what two hops cost with nothing in them",
        ));
        ratios.push(Ratio::context(
            &format!("chain p50 ×{connections}: loopback microservices / hello alone"),
            loopback / alone,
            "the most a chain could beat the baseline by, were its middlewares free",
        ));
    }
    Ok((phases, ratios, figures))
}
