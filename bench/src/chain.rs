//! The chain phase: what a middleware chain costs. One real `edged` on loopback serves, side
//! by side:
//!
//! 1. the p3 hello alone;
//! 2. [auth, header, hello] composed into one component (`middleware = [...]`): a hop is a
//!    function call;
//! 3. the same three as separate functions calling each other over loopback HTTP (the
//!    "microservices" baseline): `p3-forward` plays auth, then header, each sending the request
//!    on with `wasi:http/client` to the next function's route on the same node.
//!
//! Every request carries the bearer token, so all three answer with hello's body. Goals: the
//! chain's p50 within 1.2× of hello alone, and at least 10× faster than the baseline.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Stdio;

use anyhow::{Context, Result};

use crate::http::load_with;
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
         middleware = [{auth}, {header}]\n{limits}",
        hello = wasm("p3-hello.wasm"),
        auth = wasm("p3-auth.wasm"),
        header = wasm("p3-header.wasm"),
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
            "chain: auth -> header -> hello over loopback HTTP",
            "/svc-auth",
        ),
    ];
    let headers = [("authorization", TOKEN)];
    let mut phases = Vec::new();
    let mut figures = Vec::new();
    for (name, path) in targets {
        load_with(
            edged.http,
            path,
            &headers,
            params.connections,
            params.connections * 20,
        )
        .await?;
        let (samples, rps) = load_with(
            edged.http,
            path,
            &headers,
            params.connections,
            params.requests,
        )
        .await?;
        phases.push(summarize(name, &samples));
        figures.push(Figure {
            name: format!("{name}: requests/s ({} connections)", params.connections),
            value: rps,
            unit: "req/s".into(),
        });
    }
    let p50 = |i: usize| phases[i].p50_us;
    let (alone, chain, loopback) = (0, 1, 2);
    let ratios = vec![
        Ratio::new(
            "chain p50: [auth, header, hello] / hello alone",
            p50(chain) / p50(alone),
            "<= 1.2",
            |v| v <= 1.2,
        ),
        Ratio::new(
            "chain p50: loopback microservices / composed chain",
            p50(loopback) / p50(chain),
            ">= 10",
            |v| v >= 10.0,
        ),
    ];
    Ok((phases, ratios, figures))
}
