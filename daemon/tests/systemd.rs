//! edged as a systemd service: the install script, the unit file (checked by
//! `systemd-analyze verify`), and the notify protocol over a real `NOTIFY_SOCKET`.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Edged, guest};

fn repo_root() -> std::path::PathBuf {
    edged_testkit::workspace_root()
}

fn install(dest: &Path, args: &[&str]) -> std::process::Output {
    Command::new("bash")
        .arg(repo_root().join("scripts/install.sh"))
        .args(args)
        .env("DESTDIR", dest)
        .output()
        .unwrap()
}

#[test]
fn install_script_is_idempotent_and_the_unit_verifies() {
    let dest = tempfile::tempdir().unwrap();
    let binary = env!("CARGO_BIN_EXE_edged");
    let out = install(dest.path(), &["--binary", binary]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let unit = dest.path().join("lib/systemd/system/edged.service");
    let config = dest.path().join("etc/edged/edged.toml");
    assert!(dest.path().join("usr/bin/edged").exists());
    assert!(config.exists());

    // An operator's edit survives a re-install (upgrade).
    std::fs::write(
        &config,
        "[node]\nstate_dir = \"/var/lib/edged\"\nhttp_listen = \"0.0.0.0:9000\"\n",
    )
    .unwrap();
    let out = install(dest.path(), &["--binary", binary]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(std::fs::read_to_string(&config).unwrap().contains("9000"));

    // systemd-analyze checks the executables exist, so point them at the built binary.
    let text = std::fs::read_to_string(&unit).unwrap();
    for needed in [
        "Type=notify",
        "WatchdogSec=",
        "ExecReload=",
        "Restart=on-failure",
        "ProtectSystem=strict",
        "ProtectHome=true",
        "NoNewPrivileges=true",
        "PrivateTmp=true",
        "ReadWritePaths=/var/lib/edged",
        "CapabilityBoundingSet=",
        "StateDirectory=edged",
    ] {
        assert!(text.contains(needed), "unit lacks {needed}");
    }
    let checked = dest.path().join("edged.service");
    std::fs::write(&checked, text.replace("/usr/bin/edged", binary)).unwrap();
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&checked)
        .output()
        .expect("systemd-analyze is installed by scripts/install-test-deps.sh");
    let stderr = String::from_utf8_lossy(&verify.stderr);
    assert!(
        verify.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {stderr}"
    );

    let out = install(dest.path(), &["--uninstall"]);
    assert!(out.status.success());
    assert!(!dest.path().join("usr/bin/edged").exists());
    assert!(!unit.exists());
    assert!(config.exists(), "uninstall keeps the config unless --purge");
    let out = install(dest.path(), &["--uninstall", "--purge"]);
    assert!(out.status.success());
    assert!(!config.exists());
}

/// Reads notify datagrams until `want` arrives (or fails after `timeout`); returns all seen.
fn wait_for(socket: &UnixDatagram, seen: &mut Vec<String>, want: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        socket
            .set_read_timeout(Some(
                deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1)),
            ))
            .unwrap();
        let Ok(n) = socket.recv(&mut buf) else {
            continue;
        };
        let lines: Vec<String> = String::from_utf8_lossy(&buf[..n])
            .lines()
            .map(String::from)
            .collect();
        let found = lines.iter().any(|l| l == want);
        seen.extend(lines);
        if found {
            return;
        }
    }
    panic!("no {want} within {timeout:?}; saw {seen:?}");
}

#[test]
fn notify_protocol_ready_watchdog_reload_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    let functions = format!(
        "[[function]]\nname = \"hello\"\nwasm = {}\nroute = \"/hello\"\n",
        guest("hello-http.wasm")
    );
    let edged = Edged::start_with_env(
        &functions,
        &[
            ("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "400000"),
        ],
    );
    let mut seen = Vec::new();
    wait_for(&socket, &mut seen, "READY=1", Duration::from_secs(30));
    assert_eq!(
        seen.first().map(String::as_str),
        Some("READY=1"),
        "READY must come first: {seen:?}"
    );
    wait_for(&socket, &mut seen, "WATCHDOG=1", Duration::from_secs(5));
    wait_for(&socket, &mut seen, "WATCHDOG=1", Duration::from_secs(5));

    edged.signal(libc::SIGHUP);
    let mark = seen.len();
    wait_for(&socket, &mut seen, "RELOADING=1", Duration::from_secs(10));
    assert!(
        seen[mark..]
            .iter()
            .any(|l| l.starts_with("MONOTONIC_USEC=")),
        "RELOADING needs MONOTONIC_USEC: {seen:?}"
    );
    wait_for(&socket, &mut seen, "READY=1", Duration::from_secs(30));

    edged.signal(libc::SIGTERM);
    wait_for(&socket, &mut seen, "STOPPING=1", Duration::from_secs(10));

    let order: Vec<&str> = seen
        .iter()
        .map(String::as_str)
        .filter(|l| matches!(*l, "READY=1" | "RELOADING=1" | "STOPPING=1"))
        .collect();
    assert_eq!(
        order,
        ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"],
        "{seen:?}"
    );
}
