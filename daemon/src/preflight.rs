//! Preflight: the checks `edged check-config` runs on a parsed config, so that `ok` means start
//! can use it. Everything start would trip over that needs no network:
//!
//! - each function's `.wasm` is readable, WebAssembly (or WAT), valid for this node's engine, a
//!   guest kind the node runs (a p1 command or a `wasi:http` component) importing nothing the
//!   node does not link, and exports the init function `init = "<name>"` names (start compiles
//!   it: `functions`);
//! - a function with `middleware` passes every check the chain's composition makes before any
//!   work (`edged_compiler::check_chain`: each part a `wasi:http` 0.3 component, handlers
//!   imported and exported where they must be);
//! - the `[control]` identity (`ca.pem`, `<node_name>.pem`/`.key`) loads and makes TLS configs,
//!   and every trusted key file parses, unless `dev_identity` is about to create them (start
//!   loads them in `control::ControlIdentity::load`);
//! - the `[registry]` credentials file (`USERNAME:PASSWORD`) and CA file load (start loads
//!   them in `registry_origin::RegistryOrigin::new`);
//! - `state_dir` is a writable directory, or can be created (start opens the store there);
//! - the engine's pool fits the address space this process can reserve (start probes it and
//!   refuses an explicit `[engine]` pool that cannot fit: `pool_sizing`).
//!
//! Start stops at its first failure; this reports every problem, one line each. It looks and
//! never writes: nothing is created, compiled or stored.

use std::ffi::CString;
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use edged_compiler::{EngineSettings, Target};
use edged_control::FleetIdentity;
use edged_node_config::{ControlConfig, FunctionConfig, InitSetting, NodeConfig, RegistryConfig};

/// One thing start could not use: the setting or file, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// What is wrong, as the config names it: "function `hello`", "state_dir /var/lib/edged".
    pub subject: String,
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.subject, self.reason)
    }
}

/// Every problem start would meet with `config`, in config order; empty when there is none.
pub fn check(config: &NodeConfig) -> Vec<Problem> {
    let mut problems = Vec::new();
    check_functions(config, &mut problems);
    if let Some(control) = &config.control {
        check_control(control, &mut problems);
    }
    if let Some(registry) = &config.registry {
        check_registry(registry, &mut problems);
    }
    if let Err(reason) = check_state_dir(&config.state_dir) {
        problems.push(Problem {
            subject: format!("state_dir {}", config.state_dir.display()),
            reason,
        });
    }
    if let Err(too_large) = crate::pool_sizing::check(config) {
        let reason = too_large.to_string();
        problems.push(Problem {
            subject: "[engine]".into(),
            reason: reason
                .strip_prefix("[engine] ")
                .unwrap_or(&reason)
                .to_string(),
        });
    }
    problems
}

fn check_functions(config: &NodeConfig, problems: &mut Vec<Problem>) {
    if config.functions.is_empty() {
        return;
    }
    // Validation needs the engine start compiles with; its settings change what is accepted.
    let settings = EngineSettings {
        memory_reservation: config.engine.memory_reservation_bytes,
        memory_guard_size: config.engine.memory_guard_bytes,
    };
    let engine = match Target::host()
        .ok_or_else(|| "this host has no edged target".to_string())
        .and_then(|t| edged_compiler::engine_for(t, &settings).map_err(|e| e.to_string()))
    {
        Ok(engine) => engine,
        Err(reason) => {
            problems.push(Problem {
                subject: "[engine]".into(),
                reason,
            });
            return;
        }
    };
    for function in &config.functions {
        // A chain's app is a function's `.wasm` too: its init export is checked once the
        // chain's own checks pass.
        let checked = if function.middleware.is_empty() {
            check_wasm(&engine, function)
        } else {
            check_chain(&settings, function).and_then(|()| check_wasm(&engine, function))
        };
        if let Err(reason) = checked {
            problems.push(Problem {
                subject: format!("function `{}`", function.name),
                reason: one_line(&reason),
            });
        }
    }
}

/// What `functions::ensure_deployed` needs from the file before it compiles.
fn check_wasm(engine: &wasmtime::Engine, function: &FunctionConfig) -> Result<(), String> {
    let path = function.wasm.display();
    let input = std::fs::read(&function.wasm).map_err(|e| format!("wasm {path}: {e}"))?;
    let (kind, binary) =
        edged_compiler::to_binary(&input).map_err(|e| format!("wasm {path}: {e}"))?;
    edged_compiler::validate(engine, kind, &binary).map_err(|e| format!("wasm {path}: {e}"))?;
    edged_compiler::guest_kind(kind, &binary).map_err(|e| format!("wasm {path}: {e}"))?;
    if kind == edged_compiler::WasmKind::Component
        && let Some(import) = edged_compiler::component_imports(&binary)
            .into_iter()
            .find(|name| !edged_compiler::node_provides(name))
    {
        return Err(format!(
            "wasm {path} imports `{import}`, which no edged node links (a node links {})",
            edged_compiler::NODE_IMPORTS_RULE
        ));
    }
    if let InitSetting::Func(name) = &function.init
        && !edged_compiler::exports_function(&binary, name)
    {
        return Err(format!(
            "init = \"{name}\", but {path} does not export a function `{name}`"
        ));
    }
    Ok(())
}

/// What composing `function`'s chain (its middleware, then its `.wasm`) checks before any work.
fn check_chain(settings: &EngineSettings, function: &FunctionConfig) -> Result<(), String> {
    let (_, parts) = crate::functions::read_chain(function).map_err(|e| format!("wasm {e:#}"))?;
    let (middleware, app) = crate::functions::part_inputs(&parts);
    let options = edged_compiler::CompileOptions {
        targets: vec![Target::host().ok_or("this host has no edged target")?],
        engine: settings.clone(),
        ..edged_compiler::CompileOptions::default()
    };
    edged_compiler::check_chain(&middleware, app, &options).map_err(|e| e.to_string())
}

/// The first line of a multi-line diagnostic (the WAT parser draws the offending source under
/// its message), with the position from its `--> file:line:col` line: one problem, one line.
fn one_line(reason: &str) -> String {
    let mut lines = reason.lines();
    let mut out = lines.next().unwrap_or_default().trim_end().to_string();
    let position = lines
        .filter_map(|l| l.trim_start().strip_prefix("--> "))
        .find_map(|at| at.split_once(':').map(|(_, line_col)| line_col.to_string()));
    if let Some(line_col) = position {
        out.push_str(&format!(" (at line:column {line_col})"));
    }
    out
}

fn check_control(control: &ControlConfig, problems: &mut Vec<Problem>) {
    // Start generates a throwaway fleet (CA, node certificate, signing.pub) in an identity_dir
    // without ca.pem when dev_identity is on, so those files need not exist yet.
    let dev_creates = control.dev_identity && !control.identity_dir.join("ca.pem").exists();
    if !dev_creates {
        let loaded = FleetIdentity::load(&control.identity_dir, &control.node_name)
            // Building both TLS configs parses the CA, the certificate chain and the key.
            .and_then(|fleet| fleet.server_config().and(fleet.client_config()));
        if let Err(e) = loaded {
            problems.push(Problem {
                subject: format!(
                    "[control] identity_dir {} (node_name `{}`)",
                    control.identity_dir.display(),
                    control.node_name
                ),
                reason: e.to_string(),
            });
        }
    }
    let dev_key = control.identity_dir.join("signing.pub");
    for key in &control.trusted_keys {
        if dev_creates && *key == dev_key {
            continue;
        }
        if let Err(e) = edged_control::identity::trusted_keys(std::slice::from_ref(key)) {
            problems.push(Problem {
                subject: format!("[control] trusted_keys {}", key.display()),
                reason: e.to_string(),
            });
        }
    }
}

fn check_registry(registry: &RegistryConfig, problems: &mut Vec<Problem>) {
    if let Some(path) = &registry.credentials_file
        && let Err(e) = edged_control::registry::Credentials::load(path)
    {
        problems.push(Problem {
            subject: "[registry] credentials_file".into(),
            reason: e.to_string(),
        });
    }
    if let Some(path) = &registry.ca_file
        && let Err(e) = edged_control::registry::load_ca(path)
    {
        problems.push(Problem {
            subject: "[registry] ca_file".into(),
            reason: e.to_string(),
        });
    }
}

/// `Store::open` creates `state_dir` (and its parents) and writes below it.
fn check_state_dir(dir: &Path) -> Result<(), String> {
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => {
            writable(dir).map_err(|e| format!("directory is not writable: {e}"))
        }
        Ok(_) => Err("exists and is not a directory".into()),
        // Missing, or below a file: start would create it inside its nearest existing ancestor.
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
            ) =>
        {
            let ancestor = nearest_existing(dir);
            if !ancestor.is_dir() {
                return Err(format!(
                    "cannot be created: {} is not a directory",
                    ancestor.display()
                ));
            }
            writable(&ancestor).map_err(|e| {
                format!(
                    "cannot be created: {} is not writable: {e}",
                    ancestor.display()
                )
            })
        }
        Err(e) => Err(e.to_string()),
    }
}

fn nearest_existing(dir: &Path) -> PathBuf {
    dir.ancestors()
        .skip(1)
        .find(|a| a.as_os_str().is_empty() || a.exists())
        .map(|a| {
            if a.as_os_str().is_empty() {
                Path::new(".")
            } else {
                a
            }
        })
        .unwrap_or(Path::new("/"))
        .to_path_buf()
}

/// Can this process create entries in `dir`? `access(2)` answers without writing anything, and
/// also reports read-only file systems.
fn writable(dir: &Path) -> std::io::Result<()> {
    let c = CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `c` is a NUL-terminated path that outlives the call; access(2) only reads it.
    let rc = unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_line_diagnostics_become_one_line() {
        let wat = "wasm x: WAT text does not parse: expected `(`\n     --> <anon>:3:7\n      |\n    3 | [node]\n      | ^";
        assert_eq!(
            one_line(wat),
            "wasm x: WAT text does not parse: expected `(` (at line:column 3:7)"
        );
        assert_eq!(one_line("plain"), "plain");
    }

    #[test]
    fn state_dir_kinds() {
        let tmp = std::env::temp_dir().join(format!("edged-preflight-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).unwrap();
        assert_eq!(check_state_dir(&tmp), Ok(()));
        assert_eq!(check_state_dir(&tmp.join("a/b/c")), Ok(()));
        let file = tmp.join("file");
        std::fs::write(&file, "x").unwrap();
        assert_eq!(
            check_state_dir(&file),
            Err("exists and is not a directory".into())
        );
        let err = check_state_dir(&file.join("state")).unwrap_err();
        assert!(err.contains("is not a directory"), "{err}");
        std::fs::remove_dir_all(&tmp).unwrap();
    }

    #[test]
    fn nearest_existing_stops_at_the_root_or_cwd() {
        assert_eq!(nearest_existing(Path::new("/no/such/dir")), Path::new("/"));
        assert_eq!(nearest_existing(Path::new("nosuch/dir")), Path::new("."));
    }
}
