//! The IO shell of the link emulator: a thread in the hub namespace with one `AF_PACKET` socket
//! per host's veth end, feeding every frame it receives to [`Emulator`] and sending what it
//! hands back when due. The sockets use `PACKET_VNET_HDR`, so a frame's checksum-offload state
//! travels with it from one veth to the other and TCP's checksums stay valid without userspace
//! recomputing them. Stops, and joins its thread, on drop.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::Lab;
use super::emulator::{Emulator, Impairment, PortCounters};

/// `struct virtio_net_hdr` without the `num_buffers` field: what `PACKET_VNET_HDR` prepends.
const VNET_HDR: usize = 10;
/// Longest frame the switch reads: GSO is off on every lab link, so a frame is at most the MTU
/// plus headers; anything longer is truncated by the kernel and would be corrupt.
const FRAME_MAX: usize = VNET_HDR + 1514 + 4;
/// Longest the switch sleeps with nothing due, so that it notices `stop`.
const IDLE: Duration = Duration::from_millis(20);

pub struct Switch {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<io::Result<io::Result<Vec<PortCounters>>>>>,
}

/// A raw socket on `dev` (in the calling thread's namespace) for every protocol, non-blocking,
/// with virtio-net headers, and the interface in promiscuous mode so it passes every frame.
fn port_socket(dev: &str) -> io::Result<OwnedFd> {
    let name = std::ffi::CString::new(dev).map_err(io::Error::other)?;
    // SAFETY: a NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Err(io::Error::last_os_error());
    }
    let all = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: socket(2) with constant arguments; owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            i32::from(all),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    let rcvbuf: libc::c_int = 4 << 20;
    for (option, value) in [(libc::PACKET_VNET_HDR, &one), (libc::SO_RCVBUF, &rcvbuf)] {
        let level = if option == libc::SO_RCVBUF {
            libc::SOL_SOCKET
        } else {
            libc::SOL_PACKET
        };
        // SAFETY: an int option, pointer and size of an int.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                level,
                option,
                (value as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // SAFETY: zeroed sockaddr_ll is valid; the fields set below make it a bind address.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = all;
    addr.sll_ifindex = ifindex as i32;
    // SAFETY: bind(2) with a sockaddr_ll and its size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: zeroed packet_mreq is valid; PACKET_MR_PROMISC on the bound interface.
    let mut mreq: libc::packet_mreq = unsafe { std::mem::zeroed() };
    mreq.mr_ifindex = ifindex as i32;
    mreq.mr_type = libc::PACKET_MR_PROMISC as u16;
    // SAFETY: setsockopt(2) with a packet_mreq and its size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_ADD_MEMBERSHIP,
            (&mreq as *const libc::packet_mreq).cast(),
            size_of::<libc::packet_mreq>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Reads every frame waiting on `fd` into the emulator as coming from `port`. Frames the socket
/// sees leaving the interface (the switch's own sends) are skipped.
fn drain(fd: &OwnedFd, port: usize, emulator: &mut Emulator, buf: &mut [u8]) -> io::Result<()> {
    loop {
        // SAFETY: zeroed sockaddr_ll is valid as an out-parameter.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut len = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: recvfrom(2) into `buf` and `from`, with their sizes.
        let n = unsafe {
            libc::recvfrom(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&mut from as *mut libc::sockaddr_ll).cast(),
                &mut len,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock => Ok(()),
                io::ErrorKind::Interrupted => continue,
                _ => Err(e),
            };
        }
        if from.sll_pkttype == libc::PACKET_OUTGOING {
            continue;
        }
        emulator.receive(Instant::now(), port, &buf[..n as usize]);
    }
}

impl Switch {
    /// Starts switching between every host of `lab`, host `i` getting `impairments[i]`.
    pub fn start(lab: &Lab, impairments: &[Impairment], seed: u64) -> io::Result<Switch> {
        let devs: Vec<String> = lab.hosts.iter().map(|h| h.hub_dev.clone()).collect();
        let mut emulator = Emulator::new(impairments, seed).with_prefix(VNET_HDR);
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = lab.hub.spawn("netlab-switch", move || {
            let sockets: io::Result<Vec<OwnedFd>> = devs.iter().map(|d| port_socket(d)).collect();
            let sockets = match sockets {
                Ok(s) => {
                    let _ = ready_tx.send(Ok(()));
                    s
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(io::Error::new(e.kind(), e.to_string())));
                    return Err(e);
                }
            };
            let mut polls: Vec<libc::pollfd> = sockets
                .iter()
                .map(|s| libc::pollfd {
                    fd: s.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect();
            let mut buf = vec![0u8; FRAME_MAX];
            while !stopping.load(Ordering::Relaxed) {
                let wait = emulator
                    .next_due()
                    .map(|due| due.saturating_duration_since(Instant::now()))
                    .unwrap_or(IDLE)
                    .min(IDLE);
                // Round up: a 0 ms poll for a frame due in 0.4 ms would spin.
                let ms = wait.as_micros().div_ceil(1000) as libc::c_int;
                // SAFETY: poll(2) over the vector's pollfds.
                let ready =
                    unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as libc::nfds_t, ms) };
                if ready < 0 {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
                for (port, p) in polls.iter_mut().enumerate() {
                    if p.revents & libc::POLLIN != 0 {
                        drain(&sockets[port], port, &mut emulator, &mut buf)?;
                    }
                    p.revents = 0;
                }
                while let Some((port, frame)) = emulator.pop_due(Instant::now()) {
                    // SAFETY: send(2) of the frame's bytes on a bound packet socket. A full
                    // queue (ENOBUFS, EAGAIN) drops the frame, as a real switch would.
                    unsafe {
                        libc::send(
                            sockets[port].as_raw_fd(),
                            frame.as_ptr().cast(),
                            frame.len(),
                            0,
                        )
                    };
                }
            }
            Ok(emulator.counters())
        })?;
        ready_rx
            .recv()
            .map_err(|_| io::Error::other("switch thread ended before it was ready"))??;
        Ok(Switch {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the switch; what it forwarded and dropped per port.
    pub fn stop(mut self) -> io::Result<Vec<PortCounters>> {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread.take().expect("joined only here or on drop");
        thread
            .join()
            .map_err(|_| io::Error::other("switch thread panicked"))??
    }
}

impl Drop for Switch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::super::LinkShape;
    use super::*;

    /// Real namespaces and packets: needs root (skipped, saying so, otherwise). Two hosts, 40 ms
    /// one way towards each and no loss: a first TCP connect takes at least one round trip (80 ms; two with the
    /// ARP exchange before it), and 1 MB
    /// over the 10 Mbit/s links cannot take less than 0.8 s, so a switch that skipped the delay,
    /// a tbf that did not shape, or a checksum the frames lost on the way would each fail here.
    #[test]
    fn tcp_across_the_switch_sees_the_delay_and_the_rate() {
        // SAFETY: geteuid(2) has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            println!("note: not root, the switch test is skipped");
            return;
        }
        let lab = Lab::create(2, LinkShape { rate_mbit: 10 }).expect("lab");
        let delay = Duration::from_millis(40);
        let shape = Impairment { delay, loss: 0.0 };
        let switch = Switch::start(&lab, &[shape, shape], 7).expect("switch");
        let to: std::net::SocketAddr = (lab.hosts[1].addr, 9000).into();
        let listener = lab.hosts[1]
            .netns
            .within(move || std::net::TcpListener::bind(to))
            .expect("listen");
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().expect("accept");
            let mut got = Vec::new();
            stream.read_to_end(&mut got).expect("read");
            got.len()
        });
        let connect_started = Instant::now();
        let mut stream = lab.hosts[0]
            .netns
            .within(move || std::net::TcpStream::connect(to))
            .expect("connect");
        let connected = connect_started.elapsed();
        let sent = Instant::now();
        stream.write_all(&vec![7u8; 1_000_000]).expect("write");
        drop(stream);
        assert_eq!(server.join().expect("server"), 1_000_000);
        let transfer = sent.elapsed();
        let counters = switch.stop().expect("switch ran");
        println!("connect {connected:?}, 1 MB in {transfer:?}, counters {counters:?}");
        assert!(connected >= 2 * delay, "connect took {connected:?}");
        assert!(
            connected < 2 * delay + Duration::from_millis(200),
            "{connected:?}"
        );
        assert!(
            transfer >= Duration::from_millis(800),
            "1 MB took {transfer:?}"
        );
        assert!(counters[1].forwarded_bytes >= 1_000_000, "{counters:?}");
        let prefix = lab.prefix.clone();
        drop(lab);
        assert!(super::super::namespaces_with(&prefix).unwrap().is_empty());
    }
}
