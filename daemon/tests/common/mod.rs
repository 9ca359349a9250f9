//! A real `edged` process on a loopback port, for end-to-end tests.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub mod fleet;
pub mod registry;

pub struct Edged {
    pub child: Child,
    pub addr: SocketAddr,
    /// The QUIC control address, when the config has a `[control]` table.
    pub control: Option<SocketAddr>,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
}

/// `guests/out/<file>` as a TOML string literal.
pub fn guest(file: &str) -> String {
    format!("{:?}", edged_testkit::guest(file).display().to_string())
}

impl Edged {
    /// Starts `edged --config` with `functions` (TOML `[[function]]` tables) appended to a
    /// node section on an ephemeral port. Waits until it prints its address.
    pub fn start(functions: &str) -> Edged {
        Edged::start_with_env(functions, &[])
    }

    pub fn start_with_env(functions: &str, env: &[(&str, &str)]) -> Edged {
        let mut command = Command::new(env!("CARGO_BIN_EXE_edged"));
        command.envs(env.iter().copied());
        Edged::spawn(command, &config_text(functions))
    }

    /// Starts `command --config <dir>/edged.toml` with `config` as the whole config file (paths
    /// in it are relative to a fresh temp dir). `command` is the daemon, or an emulator running
    /// it. Waits until it prints its address.
    pub fn spawn(command: Command, config: &str) -> Edged {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("edged.toml");
        std::fs::write(&config_path, config).unwrap();
        Edged::spawn_in(command, dir)
    }

    /// Kills the daemon (SIGKILL: a crash) and starts it again on the same config and state;
    /// its log continues in the same file. Its ports are new (they were ephemeral).
    pub fn crash_and_restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let (child, addr, control) =
            Edged::launch(Command::new(env!("CARGO_BIN_EXE_edged")), self.dir.path());
        (self.child, self.addr, self.control) = (child, addr, control);
    }

    fn spawn_in(command: Command, dir: tempfile::TempDir) -> Edged {
        let (child, addr, control) = Edged::launch(command, dir.path());
        Edged {
            child,
            addr,
            control,
            config_path: dir.path().join("edged.toml"),
            dir,
        }
    }

    /// Runs `command --config <dir>/edged.toml`, logging to `<dir>/edged.log`, until it prints
    /// its addresses.
    fn launch(mut command: Command, dir: &Path) -> (Child, SocketAddr, Option<SocketAddr>) {
        install_crypto_provider();
        let config_path = dir.join("edged.toml");
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("edged.log"))
            .unwrap();
        let mut child = command
            .arg("--config")
            .arg(&config_path)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut control = None;
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("edged control on quic://") {
                    control = Some(addr.parse::<SocketAddr>().unwrap());
                }
                if let Some(addr) = line.strip_prefix("edged listening on http://") {
                    let _ = tx.send((addr.parse::<SocketAddr>().unwrap(), control));
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(180)) {
            Ok((addr, control)) => (child, addr, control),
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "edged did not start:\n{}",
                    std::fs::read_to_string(dir.join("edged.log")).unwrap_or_default()
                );
            }
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("edged.log")).unwrap_or_default()
    }

    pub fn rewrite_config(&self, functions: &str) {
        std::fs::write(&self.config_path, config_text(functions)).unwrap();
    }

    pub fn write_raw_config(&self, text: &str) {
        std::fs::write(&self.config_path, text).unwrap();
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: plain kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.child.id() as i32, signal) };
        assert_eq!(rc, 0, "kill failed");
    }

    pub fn state_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Bytes in the store's `tmp/` files named `<prefix>…` (partial uploads or downloads).
    pub fn partial_bytes(&self, prefix: &str) -> u64 {
        // A partial is a file (an upload, a registry pull) or a directory of verified pieces
        // (a blob fetched from peers piecewise).
        fn size_of(path: &std::path::Path) -> u64 {
            match std::fs::metadata(path) {
                Ok(m) if m.is_dir() => std::fs::read_dir(path)
                    .map(|dir| dir.flatten().map(|e| size_of(&e.path())).sum())
                    .unwrap_or(0),
                Ok(m) => m.len(),
                Err(_) => 0,
            }
        }
        std::fs::read_dir(self.dir.path().join("state/tmp"))
            .map(|dir| {
                dir.flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
                    .map(|e| size_of(&e.path()))
                    .sum()
            })
            .unwrap_or(0)
    }
}

impl Drop for Edged {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The workspace's reqwest has rustls without a built-in provider (the OCI registry client
/// brings it, and the fleet uses ring everywhere), so a test process picks ring once before its
/// HTTP clients are built. Every test starts a node before it talks HTTP to it.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A node section on ephemeral ports with state under the config's directory, then `functions`.
pub fn config_text(functions: &str) -> String {
    format!(
        "[node]\nstate_dir = \"state\"\nhttp_listen = \"127.0.0.1:0\"\ndrain_timeout_ms = 5000\n\n{functions}"
    )
}

pub async fn get(url: &str) -> (u16, String) {
    let response = reqwest::get(url).await.unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

pub async fn get_with_host(url: &str, host: &str) -> (u16, String) {
    let response = reqwest::Client::new()
        .get(url)
        .header("host", host)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

pub async fn post(url: &str, body: Vec<u8>) -> (u16, String) {
    let response = reqwest::Client::new()
        .post(url)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

/// The value of the first `/metrics` sample of `node` whose line starts with `prefix`.
pub async fn metric(node: &Edged, prefix: &str) -> Option<f64> {
    let (_, text) = get(&node.url("/metrics")).await;
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
