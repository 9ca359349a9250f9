//! An operator fleet for end-to-end tests: a CA, operator identity and signing key from a real
//! `edgectl init`, node certificates from `edgectl issue-node`, and `edgectl` runs against nodes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::Edged;

pub fn edgectl_bin() -> PathBuf {
    edged_testkit::workspace_binary("edgectl")
}

pub fn edgectl(identity: &Path, node: &Edged, args: &[&str]) -> Output {
    edgectl_env(identity, node, &[], args)
}

/// `edgectl` for tests: never the user's compile cache, but one shared under cargo's
/// per-target scratch directory (a test that needs its own passes `EDGECTL_CACHE_DIR`).
pub fn edgectl_command() -> Command {
    let mut command = Command::new(edgectl_bin());
    command.env(
        "EDGECTL_CACHE_DIR",
        Path::new(env!("CARGO_TARGET_TMPDIR")).join("edgectl-cache"),
    );
    command
}

/// [`edgectl`] with extra environment variables (e.g. its own `EDGECTL_CACHE_DIR`).
pub fn edgectl_env(identity: &Path, node: &Edged, env: &[(&str, &str)], args: &[&str]) -> Output {
    edgectl_command()
        .envs(env.iter().copied())
        .args(["--identity", identity.to_str().unwrap()])
        .args([
            "--node",
            &node.control.expect("control plane on").to_string(),
        ])
        .args(args)
        .output()
        .unwrap()
}

/// `edgectl --json push FILE --name NAME --target x86_64` (one target keeps tests quick); its
/// JSON report.
pub fn push_x86_64(operator: &Path, node: &Edged, file: &Path, name: &str) -> serde_json::Value {
    let out = ok(edgectl(
        operator,
        node,
        &[
            "--json",
            "push",
            file.to_str().unwrap(),
            "--name",
            name,
            "--target",
            "x86_64",
        ],
    ));
    serde_json::from_str(out.trim()).unwrap()
}

pub fn ok(output: Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "edgectl failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

pub fn refused(output: Output) -> String {
    assert!(!output.status.success(), "edgectl should have failed");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A fleet (operator identity) and a node identity issued from it.
pub struct Fleet {
    _dir: tempfile::TempDir,
    pub operator: PathBuf,
    pub node: PathBuf,
}

impl Fleet {
    /// Issues a node certificate `name` (like `edgectl issue-node`) into its own directory.
    pub fn issue_node(&self, name: &str) -> PathBuf {
        let out = self.operator.parent().unwrap().join(name);
        as_operator(
            &self.operator,
            &["issue-node", name, "--out", out.to_str().unwrap()],
        );
        out
    }
}

/// Runs an offline `edgectl` command with the operator identity in `operator`; must succeed.
fn as_operator(operator: &Path, args: &[&str]) {
    let out = edgectl_command()
        .args(["--identity", operator.to_str().unwrap()])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn new_fleet() -> Fleet {
    let dir = tempfile::tempdir().unwrap();
    let operator = dir.path().join("operator");
    let node = dir.path().join("node");
    as_operator(&operator, &["init"]);
    as_operator(
        &operator,
        &["issue-node", "node", "--out", node.to_str().unwrap()],
    );
    Fleet {
        _dir: dir,
        operator,
        node,
    }
}

pub fn control_section(fleet: &Fleet) -> String {
    format!(
        "[control]\nlisten = \"127.0.0.1:0\"\nidentity_dir = {:?}\nnode_name = \"node\"\ntrusted_keys = [{:?}]\n\n",
        fleet.node.display().to_string(),
        fleet.operator.join("signing.pub").display().to_string()
    )
}

/// A whole config for a syncing node `name` (its own certificate from `fleet`) on ephemeral
/// ports, syncing every second with `peers` (control addresses); `sync_options` go into its
/// `[sync]` table, `extra` tables after it.
pub fn sync_node_config(
    fleet: &Fleet,
    name: &str,
    peers: &[SocketAddr],
    sync_options: &str,
    extra: &str,
) -> String {
    let identity = fleet.issue_node(name);
    let peers: Vec<String> = peers.iter().map(|p| format!("\"{p}\"")).collect();
    super::config_text(&format!(
        "[control]\nlisten = \"127.0.0.1:0\"\nidentity_dir = {:?}\nnode_name = {name:?}\n\
         trusted_keys = [{:?}]\n\n[sync]\npeers = [{}]\ninterval_ms = 1000\n{sync_options}\n\n{extra}",
        identity.display().to_string(),
        fleet.operator.join("signing.pub").display().to_string(),
        peers.join(", ")
    ))
}
