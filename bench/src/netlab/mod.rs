//! A network lab of real namespaces for the WAN fleet phase: a hub namespace holding one veth
//! end per host namespace, a `tbf` qdisc on both ends of every veth capping the host's rate each
//! way, and (in [`emulator`], moved by a userspace switch in the hub) a one-way delay and loss
//! per host. Every name starts with a prefix unique to the lab (`ewan-<pid>-<n>-`, so labs of
//! concurrent tests or runs never meet); [`Lab`] removes its namespaces (and with them every
//! interface and process inside) on drop, and [`Lab::create`] first removes the leftovers of
//! labs whose process is gone (a killed run).

pub mod emulator;
pub mod netns;
pub mod switch;

use std::net::Ipv4Addr;

use anyhow::Result;

use netns::{Netns, output, run};

/// What every lab namespace's name starts with, before its lab's `<pid>-<n>-`.
pub const PREFIX: &str = "ewan-";

/// Labs this process made so far: the `<n>` of the next lab's prefix.
static LABS_MADE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// One host's link to the hub, as the lab sets it up.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkShape {
    /// `tbf` rate each way, in Mbit/s.
    pub rate_mbit: u32,
}

/// A host of the lab: its namespace, the address of its `eth0`, and the hub end of its veth.
#[derive(Debug)]
pub struct Host {
    pub netns: Netns,
    pub addr: Ipv4Addr,
    /// The veth end in the hub namespace (`h<index>`), which the switch reads and writes.
    pub hub_dev: String,
}

pub struct Lab {
    /// `ewan-<pid>-<n>-`: what this lab's namespace names start with.
    prefix: String,
    pub hub: Netns,
    pub hosts: Vec<Host>,
}

/// The address of host `index`: 10.77.0.0/16, host 0 at 10.77.0.1.
pub fn host_addr(index: usize) -> Ipv4Addr {
    let n = index as u32 + 1;
    Ipv4Addr::new(10, 77, (n >> 8) as u8, (n & 0xff) as u8)
}

/// `tc` arguments for a `tbf` at `rate_mbit`: a burst of a few frames (so the rate holds at
/// short timescales too) and a queue of 100 ms at the rate, about one bandwidth-delay product
/// of the phase's default link.
fn tbf_args(dev: &str, rate_mbit: u32) -> Vec<String> {
    let queue_bytes = (u64::from(rate_mbit) * 1_000_000 / 8 / 10).max(16_000);
    [
        "qdisc",
        "add",
        "dev",
        dev,
        "root",
        "tbf",
        "rate",
        &format!("{rate_mbit}mbit"),
        "burst",
        "15000",
        "limit",
        &queue_bytes.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The namespaces `ip netns list` shows whose names start with `prefix`.
pub fn namespaces_with(prefix: &str) -> Result<Vec<String>> {
    Ok(output("ip", &["netns", "list"])?
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(prefix))
        .map(String::from)
        .collect())
}

/// The process that made a lab namespace, read off its name (`ewan-<pid>-...`).
fn maker_of(name: &str) -> Option<u32> {
    name.strip_prefix(PREFIX)?.split('-').next()?.parse().ok()
}

/// Lab namespaces whose making process no longer runs: what a killed run left behind. A name
/// without a pid (an older layout) counts as a leftover too.
pub fn orphaned() -> Result<Vec<String>> {
    Ok(namespaces_with(PREFIX)?
        .into_iter()
        .filter(|n| {
            maker_of(n).is_none_or(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())
        })
        .collect())
}

impl Lab {
    /// The hub and `hosts` host namespaces (`<PREFIX>h<i>`), each host's `eth0` at
    /// [`host_addr`] with loopback up, both veth ends shaped to `shape`. Segmentation offload is
    /// off on both ends (`gso_max_segs 1`), so each frame the switch sees is one wire frame
    /// and loss hits segments, as on a real link.
    pub fn create(hosts: usize, shape: LinkShape) -> Result<Lab> {
        for name in orphaned()? {
            Netns::delete(&name)?;
        }
        let n = LABS_MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let prefix = format!("{PREFIX}{}-{n}-", std::process::id());
        let hub = Netns::create(&format!("{prefix}hub"))?;
        // From here a failure drops the lab, which removes what exists so far.
        let mut lab = Lab {
            prefix,
            hub,
            hosts: Vec::with_capacity(hosts),
        };
        for i in 0..hosts {
            let netns = Netns::create(&format!("{}h{i}", lab.prefix))?;
            let hub_dev = format!("h{i}");
            let addr = host_addr(i);
            let (ns, hubns) = (netns.name().to_string(), lab.hub.name().to_string());
            lab.hosts.push(Host {
                netns,
                addr,
                hub_dev: hub_dev.clone(),
            });
            run(
                "ip",
                &[
                    "-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", &hub_dev,
                    "netns", &hubns,
                ],
            )?;
            for (space, dev) in [(&ns, "eth0"), (&hubns, hub_dev.as_str())] {
                run(
                    "ip",
                    &[
                        "-n",
                        space,
                        "link",
                        "set",
                        "dev",
                        dev,
                        "gso_max_segs",
                        "1",
                        "gso_max_size",
                        "1514",
                    ],
                )?;
                let tbf = tbf_args(dev, shape.rate_mbit);
                let mut args = vec!["-n", space.as_str()];
                args.extend(tbf.iter().map(String::as_str));
                run("tc", &args)?;
                run("ip", &["-n", space, "link", "set", "dev", dev, "up"])?;
            }
            run(
                "ip",
                &[
                    "-n",
                    &ns,
                    "addr",
                    "add",
                    &format!("{addr}/16"),
                    "dev",
                    "eth0",
                ],
            )?;
            run("ip", &["-n", &ns, "link", "set", "dev", "lo", "up"])?;
        }
        Ok(lab)
    }

    /// This lab's namespaces that `ip netns list` shows.
    #[cfg(test)]
    pub fn namespaces(&self) -> Result<Vec<String>> {
        namespaces_with(&self.prefix)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for host in &self.hosts {
            if let Err(e) = Netns::delete(host.netns.name()) {
                eprintln!("warning: removing {}: {e:#}", host.netns.name());
            }
        }
        if let Err(e) = Netns::delete(self.hub.name()) {
            eprintln!("warning: removing {}: {e:#}", self.hub.name());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_addresses_are_distinct_and_never_the_network_or_a_broadcast() {
        let addrs: Vec<Ipv4Addr> = (0..300).map(host_addr).collect();
        assert_eq!(addrs[0], Ipv4Addr::new(10, 77, 0, 1));
        assert_eq!(addrs[255], Ipv4Addr::new(10, 77, 1, 0));
        let unique: std::collections::HashSet<_> = addrs.iter().collect();
        assert_eq!(unique.len(), addrs.len());
        assert!(!addrs.contains(&Ipv4Addr::new(10, 77, 0, 0)));
        assert!(!addrs.contains(&Ipv4Addr::new(10, 77, 255, 255)));
    }

    #[test]
    fn tbf_queue_is_a_tenth_of_a_second_at_the_rate_with_a_floor() {
        let args = tbf_args("eth0", 10);
        assert_eq!(args[7], "10mbit");
        assert_eq!(args.last().map(String::as_str), Some("125000"));
        assert_eq!(
            tbf_args("eth0", 1).last().map(String::as_str),
            Some("16000")
        );
    }

    #[test]
    fn the_maker_is_read_off_a_lab_name() {
        assert_eq!(maker_of("ewan-4242-0-hub"), Some(4242));
        assert_eq!(maker_of("ewan-4242-3-h17"), Some(4242));
        assert_eq!(maker_of("ewan-hub"), None);
        assert_eq!(maker_of("other-1-hub"), None);
    }

    /// Real namespaces: needs root (skipped, saying so, otherwise). Fails if the lab leaves any
    /// namespace of its prefix behind.
    #[test]
    fn lab_shapes_every_link_and_removes_every_namespace_on_drop() {
        // SAFETY: geteuid(2) has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            println!("note: not root, the lab test is skipped");
            return;
        }
        let prefix;
        {
            let lab = Lab::create(2, LinkShape { rate_mbit: 10 }).expect("lab");
            prefix = lab.prefix.clone();
            assert_eq!(lab.namespaces().unwrap().len(), 3);
            assert!(orphaned().unwrap().iter().all(|n| !n.starts_with(&prefix)));
            let qdisc = output(
                "ip",
                &[
                    "netns",
                    "exec",
                    lab.hosts[1].netns.name(),
                    "tc",
                    "qdisc",
                    "show",
                    "dev",
                    "eth0",
                ],
            )
            .unwrap();
            assert!(qdisc.contains("tbf") && qdisc.contains("10Mbit"), "{qdisc}");
            let hub = output("ip", &["-n", lab.hub.name(), "-br", "link"]).unwrap();
            assert!(hub.contains("h0@") && hub.contains("h1@"), "{hub}");
            let addr = output("ip", &["-n", lab.hosts[1].netns.name(), "-br", "addr"]).unwrap();
            assert!(addr.contains("10.77.0.2/16"), "{addr}");
        }
        assert!(namespaces_with(&prefix).unwrap().is_empty());
    }
}
