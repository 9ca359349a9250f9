//! A real `edged` process for the bench's phases: started (optionally under an emulator) on a
//! config file, its addresses read from the stable lines it prints on stdout, killed on drop;
//! and the resident set size of a process, as phases report it.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::netlab::netns::Netns;

pub struct EdgedProcess {
    child: Child,
    pub http: SocketAddr,
    /// The QUIC control address, when the config has a `[control]` table.
    pub control: Option<SocketAddr>,
}

impl Drop for EdgedProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl EdgedProcess {
    /// Runs `edged --config <config>` with warn-level logs to `stderr`, and waits until it
    /// prints its addresses.
    pub fn start(
        emulator: &[String],
        edged: &Path,
        config: &Path,
        stderr: Stdio,
    ) -> Result<EdgedProcess> {
        EdgedProcess::start_in(emulator, edged, config, stderr, None)
    }

    /// [`EdgedProcess::start`], inside network namespace `netns` when one is given.
    pub fn start_in(
        emulator: &[String],
        edged: &Path,
        config: &Path,
        stderr: Stdio,
        netns: Option<&Netns>,
    ) -> Result<EdgedProcess> {
        let mut command = command(emulator, edged);
        if let Some(netns) = netns {
            netns.place(&mut command);
        }
        let mut child = command
            .arg("--config")
            .arg(config)
            .env("EDGED_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .with_context(|| {
                format!(
                    "starting {} (build it with `cargo build --release -p edged`)",
                    edged.display()
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
        // Owned from here, so an error below still kills the child.
        let mut process = EdgedProcess {
            child,
            http: ([127, 0, 0, 1], 0).into(),
            control: None,
        };
        // Generous: under an emulator a start takes a while.
        let (control, http) = rx
            .recv_timeout(Duration::from_secs(300))
            .context("edged did not report its addresses")?;
        process.http = http.parse()?;
        process.control = control.map(|c| c.parse()).transpose()?;
        Ok(process)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// `binary`, or `emulator… binary` when the bench runs the daemon under an emulator.
pub fn command(emulator: &[String], binary: &Path) -> Command {
    match emulator.split_first() {
        Some((emulator, args)) => {
            let mut command = Command::new(emulator);
            command.args(args).arg(binary);
            command
        }
        None => Command::new(binary),
    }
}

/// Resident set size of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS")
}

/// The anonymous part of process `pid`'s resident set, in KiB: what it allocated (heap,
/// stacks, buffers), without the pages of files it maps (blobs, artifacts), which the kernel
/// may drop and read again under pressure.
pub fn anon_rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "RssAnon")
}

/// One `kB` line of `/proc/<pid>/status`.
fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))?
        .trim()
        .trim_end_matches(" kB")
        .trim()
        .parse()
        .ok()
}
