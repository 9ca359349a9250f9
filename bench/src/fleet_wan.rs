//! The WAN fleet phase (`--phases fleet-wan`; needs root, skipped with a note otherwise): real
//! `edged` nodes, each in a network namespace of its own ([`crate::netlab`]), every host's link
//! capped by `tbf` at `--wan-rate-mbit` each way and given `--wan-delay-ms` of one-way delay and
//! `--wan-loss` loss on what it receives by the lab's userspace switch: real packets, real QUIC,
//! real certificates. Host 0 is the operator's (`edgectl`), host 1 the origin, hosts 2.. the
//! rest of the fleet; each node is configured with the origin and the next three nodes as peers
//! (the default `[sync]` settings otherwise; nodes learn who connects, so the origin ends up
//! peered with all).
//!
//! Two rounds on fresh state: a clean one, and one where a tenth of the nodes (at least one) is
//! SIGKILLed mid-sync and started again on its state dir [`RESTART_AFTER`] later. Per round:
//! - the push over one such link, against the line-rate time of the bytes it sent;
//! - the time from the push's commit until every node serves the deployment, against the
//!   line-rate time of one copy of it;
//! - the origin's egress in copies of the deployment, from its `eth0` counter (every byte on
//!   the wire: QUIC overhead and retransmissions included), beside edged's own served-bytes;
//! - every node's RSS before the push and at its peak.
//!
//! Everything the phase creates (namespaces, interfaces, processes inside) is removed when it
//! ends, however it ends: [`Lab`] on drop.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::fleet::{self, Node, Placement, edgectl, issue_node, node_counter};
use crate::netlab::emulator::Impairment;
use crate::netlab::netns::Netns;
use crate::netlab::switch::Switch;
use crate::netlab::{Lab, LinkShape};
use crate::process::{anon_rss_kib, rss_kib};
use crate::report::{Figure, Ratio};
use crate::stats::{Summary, summarize};

pub struct Params {
    pub fleet: fleet::Params,
    pub rate_mbit: u32,
    pub delay: Duration,
    pub loss: f64,
    /// Fraction of the non-origin nodes killed mid-sync in the second round.
    pub kill_fraction: f64,
    /// How long a round may take before it is reported as not converged.
    pub timeout: Duration,
}

/// The control port every node listens on, at its host's address.
const CONTROL_PORT: u16 = 7443;
/// How long a killed node stays down.
const RESTART_AFTER: Duration = Duration::from_secs(10);
/// Probe interval while waiting for the nodes; arrival times are this coarse.
const POLL: Duration = Duration::from_millis(250);
/// Peers each node is configured with besides the origin.
const PEERS: usize = 3;
/// Goals from the issue: push at 80% of line rate; every node serving within 1.5× (2× with
/// nodes killed) the line-rate time of one copy; the origin uploading at most 1.2 copies; its
/// RSS at most 64 MiB above idle.
const PUSH_GOAL: f64 = 0.8;
const CONVERGE_GOAL: f64 = 1.5;
const CONVERGE_KILLED_GOAL: f64 = 2.0;
const EGRESS_GOAL: f64 = 1.2;
const ORIGIN_RSS_GOAL_MIB: f64 = 64.0;

/// What one round measured.
struct Round {
    killed: Vec<String>,
    push_seconds: f64,
    sent_bytes: f64,
    /// Per non-origin node, from the push's commit until it served (`None`: not in time).
    arrivals: Vec<(String, Option<Duration>)>,
    origin_wire_bytes: f64,
    origin_served_bytes: f64,
    /// Per node: RSS before the push and its peak, in KiB.
    rss: Vec<(String, u64, u64)>,
    /// The origin's anonymous RSS (without mapped files) before the push and its peak, KiB.
    origin_anon: (u64, u64),
}

impl Round {
    fn convergence(&self) -> Option<Duration> {
        self.arrivals
            .iter()
            .map(|a| a.1)
            .collect::<Option<Vec<_>>>()?
            .into_iter()
            .max()
    }
}

/// The line-rate time of `bytes` at `rate_mbit`.
fn line_time(bytes: f64, rate_mbit: u32) -> f64 {
    bytes * 8.0 / (f64::from(rate_mbit) * 1e6)
}

/// The address of node `i` (host `i + 1`; host 0 is the operator's).
fn control_addr(lab: &Lab, i: usize) -> SocketAddr {
    (lab.hosts[i + 1].addr, CONTROL_PORT).into()
}

/// Node `i`'s configured peers: the origin (node 0) and the next [`PEERS`] nodes, cyclically.
fn peers_of(i: usize, nodes: usize) -> Vec<usize> {
    let mut peers = vec![0];
    for step in 1..=PEERS {
        let p = (i + step) % nodes;
        if p != i && !peers.contains(&p) {
            peers.push(p);
        }
    }
    peers.retain(|&p| p != i);
    peers
}

/// Which nodes the kill round kills: `fraction` of the non-origin ones, at least one, spread
/// over the fleet.
fn victims(nodes: usize, fraction: f64) -> Vec<usize> {
    let others = nodes - 1;
    let count = ((others as f64 * fraction).ceil() as usize).clamp(1, others);
    (0..count).map(|k| 1 + k * others / count).collect()
}

fn placement(lab: &Lab, i: usize) -> Result<Placement> {
    Ok(Placement {
        control_listen: control_addr(lab, i).to_string(),
        netns: Some(Arc::new(Netns::open(lab.hosts[i + 1].netns.name())?)),
    })
}

fn start(params: &Params, lab: &Lab, dir: &Path, names: &[String], i: usize) -> Result<Node> {
    let peers: Vec<SocketAddr> = peers_of(i, names.len())
        .into_iter()
        .map(|p| control_addr(lab, p))
        .collect();
    fleet::start_placed(
        &params.fleet,
        dir,
        &names[i],
        &placement(lab, i)?,
        Some(&peers),
        "",
    )
}

async fn round(params: &Params, lab: &Lab, work: &Path, index: usize, kill: bool) -> Result<Round> {
    let round_dir = tempfile::Builder::new()
        .prefix(&format!("wan-round-{index}-"))
        .tempdir_in(work)?;
    let dir = round_dir.path();
    let operator = dir.join("operator");
    edgectl(&params.fleet, &operator, &["init"]).await?;
    let wasm = dir.join("big.wasm");
    std::fs::write(
        &wasm,
        edged_testkit::big_module(params.fleet.artifact_mb << 20, 0x3a7 + index as u64),
    )?;
    let n = params.fleet.nodes;
    let names: Vec<String> = (0..n).map(|i| format!("wan-{i}")).collect();
    for name in &names {
        issue_node(&params.fleet, &operator, dir, name).await?;
    }
    let mut nodes: Vec<Option<Node>> = Vec::with_capacity(n);
    for i in 0..n {
        nodes.push(Some(start(params, lab, dir, &names, i)?));
    }
    // Let every node reach its peers once (QUIC handshakes across the delay) before the clock.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle: Vec<u64> = nodes
        .iter()
        .map(|n| n.as_ref().and_then(|n| rss_kib(n.pid())).unwrap_or(0))
        .collect();
    let origin_pid = nodes[0].as_ref().expect("started").pid();
    let anon_idle = anon_rss_kib(origin_pid).unwrap_or(0);
    let mut anon_peak = anon_idle;

    let origin = nodes[0].as_ref().expect("started").info.clone();
    let origin_ns = &lab.hosts[1].netns;
    let report = fleet::push_from(
        &params.fleet,
        &operator,
        &origin,
        &wasm,
        None,
        Some(&lab.hosts[0].netns),
    )
    .await?;
    let committed = Instant::now();
    let wire_at_commit = origin_ns.interface_counter("eth0", "tx_bytes")?;
    let sent_bytes = report["sent_bytes"].as_f64().unwrap_or_default();
    let push_seconds = report["seconds"].as_f64().unwrap_or_default();
    if sent_bytes <= 0.0 {
        bail!("push report has no sent_bytes: {report}");
    }
    println!(
        "  push: {:.1} MB in {push_seconds:.1} s ({:.0}% of line rate)",
        sent_bytes / 1e6,
        100.0 * line_time(sent_bytes, params.rate_mbit) / push_seconds
    );

    let victims = if kill {
        victims(n, params.kill_fraction)
    } else {
        Vec::new()
    };
    // Mid-sync: a third of the line-rate time of one copy in, when every node holds part of it.
    let kill_at = Duration::from_secs_f64(line_time(sent_bytes, params.rate_mbit) / 3.0);
    let mut killed_at: Option<Instant> = None;
    let mut arrivals: Vec<Option<Duration>> = vec![None; n];
    let mut peak: Vec<u64> = idle.clone();
    while committed.elapsed() < params.timeout {
        if !victims.is_empty() && killed_at.is_none() && committed.elapsed() >= kill_at {
            for &v in &victims {
                nodes[v] = None; // SIGKILL: the process is killed and reaped on drop
            }
            println!(
                "  killed {} at {:.1} s",
                victims
                    .iter()
                    .map(|&v| names[v].as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                committed.elapsed().as_secs_f64()
            );
            killed_at = Some(Instant::now());
        }
        if let Some(at) = killed_at
            && at.elapsed() >= RESTART_AFTER
            && victims.iter().any(|&v| nodes[v].is_none())
        {
            for &v in &victims {
                nodes[v] = Some(start(params, lab, dir, &names, v)?);
            }
        }
        let mut probes = tokio::task::JoinSet::new();
        for (i, node) in nodes.iter().enumerate().skip(1) {
            if let (Some(node), None) = (node, arrivals[i]) {
                let info = node.info.clone();
                probes.spawn(async move { (i, matches!(info.get("/big").await, Ok((200, _)))) });
            }
        }
        while let Some(probe) = probes.join_next().await {
            let (i, serving) = probe?;
            if serving {
                arrivals[i] = Some(committed.elapsed());
            }
        }
        for (i, node) in nodes.iter().enumerate() {
            if let Some(rss) = node.as_ref().and_then(|n| rss_kib(n.pid())) {
                peak[i] = peak[i].max(rss);
            }
        }
        anon_peak = anon_peak.max(anon_rss_kib(origin_pid).unwrap_or(0));
        if arrivals.iter().skip(1).all(Option::is_some) {
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    let wire = origin_ns.interface_counter("eth0", "tx_bytes")? - wire_at_commit;
    let served = node_counter(&origin, "edged_sync_served_bytes_total")
        .await?
        .unwrap_or_default();
    Ok(Round {
        killed: victims.iter().map(|&v| names[v].clone()).collect(),
        push_seconds,
        sent_bytes,
        arrivals: names.iter().cloned().zip(arrivals).skip(1).collect(),
        origin_wire_bytes: wire as f64,
        origin_served_bytes: served,
        rss: names
            .iter()
            .cloned()
            .zip(idle.into_iter().zip(peak))
            .map(|(name, (idle, peak))| (name, idle, peak))
            .collect(),
        origin_anon: (anon_idle, anon_peak),
    })
}

pub async fn run(params: &Params, work: &Path) -> Result<(Vec<Summary>, Vec<Ratio>, Vec<Figure>)> {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("fleet-wan: skipped: it makes network namespaces, which needs root");
        return Ok(Default::default());
    }
    if params.fleet.nodes < 2 {
        bail!("--wan-nodes must be at least 2 (one to push to, one to sync)");
    }
    let n = params.fleet.nodes;
    let lab = Lab::create(
        n + 1,
        LinkShape {
            rate_mbit: params.rate_mbit,
        },
    )?;
    let shape = Impairment {
        delay: params.delay,
        loss: params.loss,
    };
    let switch = Switch::start(&lab, &vec![shape; n + 1], 0x3a7)?;
    let label = format!(
        "{n} nodes, {} Mbit/s, {} ms one way, {:.1}% loss",
        params.rate_mbit,
        params.delay.as_millis(),
        params.loss * 100.0
    );
    let mut rounds = Vec::new();
    for (index, kill) in [false, true].into_iter().enumerate() {
        println!(
            "fleet-wan round {}: {label}{}",
            index + 1,
            if kill { ", nodes killed mid-sync" } else { "" }
        );
        let round = round(params, &lab, work, index, kill)
            .await
            .with_context(|| format!("fleet-wan round {}", index + 1))?;
        let line = line_time(round.sent_bytes, params.rate_mbit);
        let served = round.arrivals.iter().filter(|a| a.1.is_some()).count();
        let mut text = String::new();
        let _ = write!(
            text,
            "  {served} of {} nodes serving; ",
            round.arrivals.len()
        );
        match round.convergence() {
            Some(t) => {
                let _ = write!(
                    text,
                    "every node in {:.1} s = {:.2}× the line-rate time of one copy ({line:.1} s)",
                    t.as_secs_f64(),
                    t.as_secs_f64() / line
                );
            }
            None => {
                let _ = write!(text, "not all within {:?}", params.timeout);
            }
        }
        let rss_max = round.rss.iter().map(|r| r.2).max().unwrap_or(0);
        println!(
            "{text}\n  origin egress {:.2} copies on the wire ({:.2} by edged's own count); \
             origin RSS {} → {} MiB (anonymous {} → {}; the rest is mapped blob and artifact \
             pages), largest node peak {} MiB",
            round.origin_wire_bytes / round.sent_bytes,
            round.origin_served_bytes / round.sent_bytes,
            round.rss[0].1 / 1024,
            round.rss[0].2 / 1024,
            round.origin_anon.0 / 1024,
            round.origin_anon.1 / 1024,
            rss_max / 1024,
        );
        rounds.push(round);
    }
    let counters = switch.stop()?;
    let lost: u64 = counters.iter().map(|c| c.lost_frames).sum();
    let forwarded: u64 = counters.iter().map(|c| c.forwarded_frames).sum();
    println!(
        "  switch: {forwarded} frames forwarded, {lost} lost ({:.2}%)",
        100.0 * lost as f64 / (forwarded + lost).max(1) as f64
    );
    drop(lab);

    let clean = &rounds[0];
    let line = line_time(clean.sent_bytes, params.rate_mbit);
    let timed_out = params.timeout.as_secs_f64();
    let converge = |r: &Round| r.convergence().map_or(timed_out, |t| t.as_secs_f64()) / line;
    let mut summaries = Vec::new();
    for (r, what) in rounds.iter().zip(["clean", "10% killed"]) {
        let times: Vec<Duration> = r.arrivals.iter().filter_map(|a| a.1).collect();
        if !times.is_empty() {
            summaries.push(summarize(
                &format!("fleet-wan arrivals after the push, {what} ({label})"),
                &times,
            ));
        }
    }
    let origin_rss_mib = |r: &Round| (r.rss[0].2.saturating_sub(r.rss[0].1)) as f64 / 1024.0;
    let ratios = vec![
        Ratio::new(
            &format!("fleet-wan: push over one link / line rate ({label})"),
            line_time(clean.sent_bytes, params.rate_mbit) / clean.push_seconds,
            &format!(">= {PUSH_GOAL}"),
            |v| v >= PUSH_GOAL,
        ),
        Ratio::new(
            "fleet-wan: every node serving / line-rate time of one copy (timeout counts as it)",
            converge(clean),
            &format!("<= {CONVERGE_GOAL}"),
            |v| v <= CONVERGE_GOAL,
        ),
        Ratio::new(
            &format!(
                "fleet-wan: the same with {} killed mid-sync and restarted",
                rounds[1].killed.join(", ")
            ),
            converge(&rounds[1]),
            &format!("<= {CONVERGE_KILLED_GOAL}"),
            |v| v <= CONVERGE_KILLED_GOAL,
        ),
        Ratio::new(
            "fleet-wan: origin egress on the wire / one copy (max over rounds)",
            rounds
                .iter()
                .map(|r| r.origin_wire_bytes / r.sent_bytes)
                .fold(0.0, f64::max),
            &format!("<= {EGRESS_GOAL}"),
            |v| v <= EGRESS_GOAL,
        ),
        Ratio::new(
            "fleet-wan: origin RSS peak above idle, MiB (max over rounds)",
            rounds.iter().map(origin_rss_mib).fold(0.0, f64::max),
            &format!("<= {ORIGIN_RSS_GOAL_MIB}"),
            |v| v <= ORIGIN_RSS_GOAL_MIB,
        ),
    ];
    let figures = vec![
        Figure {
            name: "fleet-wan: push over one link".into(),
            value: clean.sent_bytes / clean.push_seconds / 1e6,
            unit: "MB/s".into(),
        },
        Figure {
            name: "fleet-wan: every node serving, clean round".into(),
            value: clean.convergence().map_or(timed_out, |t| t.as_secs_f64()),
            unit: "s".into(),
        },
        Figure {
            name: "fleet-wan: origin anonymous RSS peak above idle (max over rounds)".into(),
            value: rounds
                .iter()
                .map(|r| r.origin_anon.1.saturating_sub(r.origin_anon.0))
                .max()
                .unwrap_or(0) as f64
                / 1024.0,
            unit: "MiB".into(),
        },
        Figure {
            name: "fleet-wan: largest node RSS peak".into(),
            value: rounds
                .iter()
                .flat_map(|r| r.rss.iter().map(|x| x.2))
                .max()
                .unwrap_or(0) as f64
                / 1024.0,
            unit: "MiB".into(),
        },
    ];
    Ok((summaries, ratios, figures))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_node_peers_with_the_origin_and_three_others_never_itself() {
        for n in [2, 3, 4, 16, 64] {
            for i in 0..n {
                let peers = peers_of(i, n);
                assert!(!peers.contains(&i), "{n} nodes, node {i}: {peers:?}");
                assert_eq!(peers.contains(&0), i != 0);
                let unique: std::collections::HashSet<_> = peers.iter().collect();
                assert_eq!(unique.len(), peers.len());
                // The next three may include the origin, counted once.
                assert!(
                    (PEERS.min(n - 1)..=PEERS + 1).contains(&peers.len()),
                    "{n} nodes, node {i}: {peers:?}"
                );
            }
        }
    }

    #[test]
    fn a_tenth_of_the_others_is_killed_at_least_one_never_the_origin() {
        assert_eq!(victims(2, 0.1), [1]);
        assert_eq!(victims(16, 0.1), [1, 8]);
        let v = victims(64, 0.1);
        assert_eq!(v.len(), 7);
        assert!(!v.contains(&0) && v.iter().all(|&i| i < 64));
        let unique: std::collections::HashSet<_> = v.iter().collect();
        assert_eq!(unique.len(), v.len());
    }

    #[test]
    fn line_time_is_bits_over_rate() {
        assert!((line_time(25.5e6, 10) - 20.4).abs() < 1e-9);
    }
}
