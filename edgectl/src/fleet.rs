//! Fleet-wide activation: `edgectl activate NAME@VERSION --fleet` and `edgectl rollback NAME
//! --fleet` sign an activation record (name, version, the next per-name sequence number) with
//! the operator's key and hand it to one node, which applies it and spreads it to its peers by
//! sync. Nodes apply a record only if it is newer than the last they applied for the name, so
//! a replayed older record is refused, and a node that was offline applies the newest when it
//! returns. A plain `activate`/`rollback` stays local to the node.

use anyhow::{Context, Result, anyhow, bail};
use ed25519_dalek::SigningKey;
use edged_control::signing::{ActivationRecord, SignedActivation, signing_key_from_hex};
use edged_control::wire::{Request, Response};

use crate::build::now_secs;
use crate::remote::{Client, Target, identity_dir};

/// The operator's signing key from the identity directory.
pub fn signing_key(target: &Target) -> Result<SigningKey> {
    let path = identity_dir(target.identity.as_deref()).join("signing.key");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    signing_key_from_hex(&text).map_err(|e| anyhow!("{}: {e}", path.display()))
}

/// Signs and sends a fleet record for `name`: `version`, or (rollback) the version before the
/// one the node serves. `sequence` overrides the next sequence number (to replace a record
/// issued elsewhere; an older one is refused by the node).
pub async fn activate(
    target: &Target,
    name: &str,
    version: Option<u64>,
    sequence: Option<u64>,
) -> Result<()> {
    let key = signing_key(target)?;
    let client = Client::connect(target).await?;
    let Response::Deployments { items } = client.call(&Request::List {}).await? else {
        bail!("the node answered the listing with something else");
    };
    let held: Vec<_> = items.iter().filter(|d| d.name == name).collect();
    if held.is_empty() {
        bail!("node {} holds no deployment `{name}`", target.node);
    }
    let version = match version {
        Some(version) => version,
        None => {
            let active = held
                .iter()
                .find(|d| d.active)
                .map(|d| d.version)
                .ok_or_else(|| anyhow!("`{name}` has no active version on {}", target.node))?;
            held.iter()
                .map(|d| d.version)
                .filter(|v| *v < active)
                .max()
                .ok_or_else(|| {
                    anyhow!(
                        "`{name}` has no version older than {active} on {}",
                        target.node
                    )
                })?
        }
    };
    let sequence = sequence.unwrap_or_else(|| {
        held.iter()
            .filter_map(|d| d.fleet_record.map(|r| r.sequence))
            .max()
            .unwrap_or(0)
            + 1
    });
    let record = ActivationRecord {
        name: name.to_string(),
        version,
        sequence,
        created_at: now_secs(),
    };
    let signed = SignedActivation::sign(record, &key);
    let response = client
        .call(&Request::ActivateFleet { record: signed })
        .await?;
    if target.json {
        println!("{}", serde_json::to_string_pretty(&response)?);
    } else if let Response::Done { message } = response {
        println!("{message}; peers follow by sync");
    }
    Ok(())
}
