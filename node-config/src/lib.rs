//! # edged-node-config
//!
//! Owns a node's configuration: the TOML schema (every field documented in
//! `node-config/edged.example.toml`), its validation, and the embedded dev default that lets
//! `edged` start with no file at all. Unknown keys and bad values are refused with the file, line
//! and reason; every number has an explicit range, checked before it is scaled to bytes. Relative
//! paths are resolved against the config file's directory. The files a config names are checked
//! by `edged check-config` (the daemon's `preflight`), not here.

mod error;
mod instances;
mod raw;
#[cfg(test)]
mod tests;
mod types;
mod validate;

pub use error::ConfigError;
pub use instances::{
    InstancePolicy, InstanceSetting, MAX_CONCURRENT_PER_INSTANCE, MAX_IDLE_TIMEOUT_MS,
    MAX_REQUESTS_PER_INSTANCE,
};
pub use types::*;
pub use validate::*;

/// The dev default: state in `./.edged-dev`, HTTP on 127.0.0.1:8080, no functions declared.
pub const DEV_DEFAULT: &str = include_str!("../dev-default.toml");
