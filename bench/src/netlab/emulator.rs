//! The link emulator's decisions, sans IO: a learning Ethernet switch whose every port adds its
//! host's receive-side impairment — a fixed one-way delay and a random loss — to the frames it
//! forwards towards that host. It takes `now` and frames in, and hands back frames when they are
//! due; the switch in the hub namespace moves the bytes. Rate is not its business: a `tbf` qdisc
//! on each veth end caps it in the kernel, and a constant delay line commutes with a FIFO rate
//! limiter, so the order of the two does not change what a host sees.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// One host's receive-side impairment: what the emulator applies to frames it forwards to it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Impairment {
    pub delay: Duration,
    /// Probability in [0, 1) that a unicast frame towards the host is dropped.
    pub loss: f64,
}

/// What the emulator did with the frames it got, per destination port.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PortCounters {
    /// Frames (and their bytes) handed back for sending to the port.
    pub forwarded_frames: u64,
    pub forwarded_bytes: u64,
    /// Unicast frames dropped by the port's loss.
    pub lost_frames: u64,
}

/// A splitmix64 generator: the loss draws are reproducible from a seed, and cheap enough for
/// every frame.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

struct Port {
    impairment: Impairment,
    /// Frames on their way to the port, due times ascending: the delay is constant per port, so
    /// arrival order is due order.
    queue: VecDeque<(Instant, Vec<u8>)>,
    counters: PortCounters,
}

pub struct Emulator {
    ports: Vec<Port>,
    /// Source MAC → the port it was last seen on.
    learned: HashMap<[u8; 6], usize>,
    rng: SplitMix64,
    /// Bytes before the Ethernet header in every frame, carried through untouched (the
    /// switch's `virtio_net_hdr`).
    prefix: usize,
}

/// Ethernet's minimum header: destination, source, type.
const ETH_HEADER: usize = 14;

impl Emulator {
    /// One port per host, in the order given.
    pub fn new(ports: &[Impairment], seed: u64) -> Emulator {
        Emulator {
            ports: ports
                .iter()
                .map(|&impairment| Port {
                    impairment,
                    queue: VecDeque::new(),
                    counters: PortCounters::default(),
                })
                .collect(),
            learned: HashMap::new(),
            rng: SplitMix64::new(seed),
            prefix: 0,
        }
    }

    /// Frames carry `prefix` bytes before their Ethernet header, which are forwarded with them.
    pub fn with_prefix(mut self, prefix: usize) -> Emulator {
        self.prefix = prefix;
        self
    }

    /// A frame received from `port`'s host at `now`: learns where its source lives and queues it
    /// towards its destination (flooded to every other port while the destination is unknown or
    /// for broadcast and multicast), each copy due after the destination's delay. Unicast copies
    /// may be lost; broadcast and multicast (ARP, here) are not, so neighbour discovery never adds
    /// its own seconds of retry timeouts to a measured figure. Runts are ignored.
    pub fn receive(&mut self, now: Instant, port: usize, frame: &[u8]) {
        if frame.len() < self.prefix + ETH_HEADER || port >= self.ports.len() {
            return;
        }
        let eth = &frame[self.prefix..];
        let dst: [u8; 6] = eth[0..6].try_into().expect("6 bytes");
        let src: [u8; 6] = eth[6..12].try_into().expect("6 bytes");
        // A multicast source is not a host; never learn it.
        if src[0] & 1 == 0 {
            self.learned.insert(src, port);
        }
        let group = dst[0] & 1 == 1;
        match self.learned.get(&dst).copied() {
            Some(to) if !group => {
                if to != port {
                    self.queue(now, to, frame, true);
                }
            }
            _ => {
                for to in (0..self.ports.len()).filter(|&p| p != port) {
                    self.queue(now, to, frame, !group);
                }
            }
        }
    }

    fn queue(&mut self, now: Instant, to: usize, frame: &[u8], lossy: bool) {
        let loss = self.ports[to].impairment.loss;
        if lossy && loss > 0.0 && self.rng.next_f64() < loss {
            self.ports[to].counters.lost_frames += 1;
            return;
        }
        let port = &mut self.ports[to];
        port.queue
            .push_back((now + port.impairment.delay, frame.to_vec()));
    }

    /// When the next queued frame is due, if any is queued.
    pub fn next_due(&self) -> Option<Instant> {
        self.ports
            .iter()
            .filter_map(|p| p.queue.front().map(|f| f.0))
            .min()
    }

    /// The earliest frame due at or before `now`, with the port it goes to.
    pub fn pop_due(&mut self, now: Instant) -> Option<(usize, Vec<u8>)> {
        let (to, _) = self
            .ports
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.queue.front().map(|f| (i, f.0)))
            .filter(|&(_, due)| due <= now)
            .min_by_key(|&(_, due)| due)?;
        let port = &mut self.ports[to];
        let (_, frame) = port.queue.pop_front().expect("front exists");
        port.counters.forwarded_frames += 1;
        port.counters.forwarded_bytes += frame.len() as u64;
        Some((to, frame))
    }

    pub fn counters(&self) -> Vec<PortCounters> {
        self.ports.iter().map(|p| p.counters.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(dst: [u8; 6], src: [u8; 6], tag: u8) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend(dst);
        f.extend(src);
        f.extend([0x08, 0x00, tag]);
        f
    }

    const A: [u8; 6] = [2, 0, 0, 0, 0, 0xa];
    const B: [u8; 6] = [2, 0, 0, 0, 0, 0xb];
    const BROADCAST: [u8; 6] = [0xff; 6];

    fn lossless(delays_ms: &[u64]) -> Emulator {
        let ports: Vec<Impairment> = delays_ms
            .iter()
            .map(|&ms| Impairment {
                delay: Duration::from_millis(ms),
                loss: 0.0,
            })
            .collect();
        Emulator::new(&ports, 1)
    }

    #[test]
    fn unknown_destination_floods_then_learned_one_goes_to_its_port_only() {
        let mut emu = lossless(&[10, 20, 30]);
        let t0 = Instant::now();
        emu.receive(t0, 0, &frame(B, A, 1));
        // Flooded to ports 1 and 2, each after its own delay.
        assert_eq!(emu.next_due(), Some(t0 + Duration::from_millis(20)));
        assert!(emu.pop_due(t0 + Duration::from_millis(19)).is_none());
        let late = t0 + Duration::from_secs(1);
        assert_eq!(emu.pop_due(late).map(|f| f.0), Some(1));
        assert_eq!(emu.pop_due(late).map(|f| f.0), Some(2));
        assert!(emu.pop_due(late).is_none());
        // B answers from port 1: A is known, so only port 0 gets it; now B is known too.
        emu.receive(t0, 1, &frame(A, B, 2));
        emu.receive(t0, 0, &frame(B, A, 3));
        let mut got: Vec<(usize, u8)> = std::iter::from_fn(|| emu.pop_due(late))
            .map(|(port, f)| (port, f[14]))
            .collect();
        got.sort();
        assert_eq!(got, vec![(0, 2), (1, 3)]);
    }

    #[test]
    fn frames_come_out_in_due_order_across_ports_and_fifo_within_one() {
        let mut emu = lossless(&[50, 5]);
        let t0 = Instant::now();
        emu.receive(t0, 1, &frame(BROADCAST, B, 0)); // learn B on port 1
        emu.receive(t0, 0, &frame(BROADCAST, A, 0)); // learn A on port 0
        let _ = std::iter::from_fn(|| emu.pop_due(t0 + Duration::from_secs(1))).count();
        for i in 0..3u8 {
            let at = t0 + Duration::from_millis(u64::from(i));
            emu.receive(at, 1, &frame(A, B, i)); // to port 0: +50 ms
            emu.receive(at, 0, &frame(B, A, 10 + i)); // to port 1: +5 ms
        }
        let mut out = Vec::new();
        let mut now = t0;
        while let Some(due) = emu.next_due() {
            now = now.max(due);
            let (port, f) = emu.pop_due(now).expect("due");
            out.push((port, f[14], due - t0));
        }
        assert_eq!(
            out,
            vec![
                (1, 10, Duration::from_millis(5)),
                (1, 11, Duration::from_millis(6)),
                (1, 12, Duration::from_millis(7)),
                (0, 0, Duration::from_millis(50)),
                (0, 1, Duration::from_millis(51)),
                (0, 2, Duration::from_millis(52)),
            ]
        );
    }

    #[test]
    fn unicast_loss_matches_its_probability_and_broadcast_is_never_lost() {
        let ports = [
            Impairment {
                delay: Duration::ZERO,
                loss: 0.0,
            },
            Impairment {
                delay: Duration::ZERO,
                loss: 0.05,
            },
        ];
        let mut emu = Emulator::new(&ports, 42);
        let t0 = Instant::now();
        emu.receive(t0, 1, &frame(BROADCAST, B, 0));
        let n = 100_000;
        for _ in 0..n {
            emu.receive(t0, 0, &frame(B, A, 0));
            emu.receive(t0, 0, &frame(BROADCAST, A, 0));
        }
        let counters = emu.counters();
        let lost = counters[1].lost_frames as f64 / n as f64;
        // 100k draws at p = 5%: the standard error is 0.07%; 0.5% is over six of them.
        assert!((lost - 0.05).abs() < 0.005, "lost {lost}");
        let delivered = std::iter::from_fn(|| emu.pop_due(t0)).count() as u64;
        // Port 0 got B's broadcast; port 1 got every broadcast and the unicast frames not lost.
        assert_eq!(delivered, 1 + n + (n - counters[1].lost_frames));
    }

    #[test]
    fn a_prefix_is_skipped_for_the_addresses_and_forwarded_with_the_frame() {
        let mut emu = lossless(&[0, 0]).with_prefix(2);
        let t0 = Instant::now();
        let with_prefix = |f: Vec<u8>| [vec![0xee, 0xee], f].concat();
        emu.receive(t0, 1, &with_prefix(frame(BROADCAST, B, 0)));
        let _ = emu.pop_due(t0);
        emu.receive(t0, 0, &with_prefix(frame(B, A, 7)));
        let (port, out) = emu.pop_due(t0).expect("learned B on port 1");
        assert_eq!((port, &out[..2], out[16]), (1, &[0xee, 0xee][..], 7));
        emu.receive(t0, 0, &[0u8; 15]); // 14 bytes of header after the prefix: too short
        assert_eq!(emu.next_due(), None);
    }

    #[test]
    fn runts_and_unknown_ports_are_ignored_and_nothing_echoes_to_its_sender() {
        let mut emu = lossless(&[0, 0]);
        let t0 = Instant::now();
        emu.receive(t0, 0, &[0u8; 10]);
        emu.receive(t0, 7, &frame(B, A, 0));
        assert_eq!(emu.next_due(), None);
        emu.receive(t0, 0, &frame(BROADCAST, A, 0));
        emu.receive(t0, 1, &frame(A, A, 0)); // claims A's MAC but A lives on 1 now
        assert_eq!(
            std::iter::from_fn(|| emu.pop_due(t0))
                .map(|f| f.0)
                .collect::<Vec<_>>(),
            vec![1]
        );
    }
}
