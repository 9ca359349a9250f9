//! A WASI p1 CGI guest that probes its capabilities, for edged's end-to-end tests.
//!
//! Query parameters (any combination, handled in this order):
//! - `sleep_ms=N` — sleep N milliseconds first (a slow but well-behaved request);
//! - `read=/path` — read a file and print `read ok: <contents>` or `read error: <error>`;
//! - `write=/path` — create a file and print `write ok` or `write error: <error>`;
//! - `env=NAME` — print `env NAME=<value>` or `env NAME unset`;
//! - `env_count` — print how many variables are set that are not CGI meta-variables;
//! - `echo` — print the request body;
//! - `forge` — fail (exit 1) after writing hostile stderr: a newline and a line shaped like the
//!   node's own log, a terminal title sequence, BEL and CR (the node must log it escaped).

use std::io::{Read, Write};

fn main() {
    let query = std::env::var("QUERY_STRING").unwrap_or_default();
    let mut out = String::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "sleep_ms" => {
                let ms = value.parse().unwrap_or(0);
                std::thread::sleep(std::time::Duration::from_millis(ms));
                out.push_str(&format!("slept {ms} ms\n"));
            }
            "read" => match std::fs::read_to_string(value) {
                Ok(text) => out.push_str(&format!("read ok: {}\n", text.trim_end())),
                Err(e) => out.push_str(&format!("read error: {e}\n")),
            },
            "write" => match std::fs::write(value, b"written by probe") {
                Ok(()) => out.push_str("write ok\n"),
                Err(e) => out.push_str(&format!("write error: {e}\n")),
            },
            "env" => match std::env::var(value) {
                Ok(v) => out.push_str(&format!("env {value}={v}\n")),
                Err(_) => out.push_str(&format!("env {value} unset\n")),
            },
            "env_count" => {
                let cgi = [
                    "GATEWAY_INTERFACE", "SERVER_SOFTWARE", "SERVER_PROTOCOL", "REQUEST_METHOD",
                    "REQUEST_URI", "SCRIPT_NAME", "PATH_INFO", "QUERY_STRING", "CONTENT_LENGTH",
                    "CONTENT_TYPE",
                ];
                let n = std::env::vars()
                    .filter(|(k, _)| !cgi.contains(&k.as_str()) && !k.starts_with("HTTP_"))
                    .count();
                out.push_str(&format!("env_count {n}\n"));
            }
            "echo" => {
                let mut body = String::new();
                let _ = std::io::stdin().read_to_string(&mut body);
                out.push_str(&format!("echo {body}\n"));
            }
            "forge" => {
                eprint!(
                    "probe failed\n2026-12-07T00:00:00.000000Z ERROR edged::node: forged by a guest\n\
                     \x1b]0;pwned\x07\rtail"
                );
                std::process::exit(1);
            }
            other => out.push_str(&format!("unknown probe {other}\n")),
        }
    }
    let mut stdout = std::io::stdout().lock();
    let _ = write!(stdout, "Content-Type: text/plain\r\nX-Probe: 1\r\n\r\n{out}");
}
