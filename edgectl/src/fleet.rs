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
/// issued elsewhere; an older one is refused by the node); `reset` starts the next epoch.
pub async fn activate(
    target: &Target,
    name: &str,
    version: Option<u64>,
    sequence: Option<u64>,
    reset: bool,
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
    let current = held
        .iter()
        .filter_map(|d| d.fleet_record.map(|r| (r.epoch, r.sequence)))
        .max();
    let (epoch, sequence) = next_place(name, current, sequence, reset)?;
    let record = ActivationRecord {
        name: name.to_string(),
        version,
        sequence,
        created_at: now_secs(),
        epoch,
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

/// The `(epoch, sequence)` of the record to sign after the one the node follows (`current`):
/// the same epoch and the next sequence (or `sequence`), or with `reset` the next epoch and
/// sequence 1 (or `sequence`). Never wraps: past the end of the range it says to reset.
fn next_place(
    name: &str,
    current: Option<(u64, u64)>,
    sequence: Option<u64>,
    reset: bool,
) -> Result<(u64, u64)> {
    let (epoch, last) = current.unwrap_or((0, 0));
    if reset {
        let epoch = epoch
            .checked_add(1)
            .ok_or_else(|| anyhow!("`{name}`'s record epoch is at the end of its range"))?;
        return Ok((epoch, sequence.unwrap_or(1)));
    }
    match sequence {
        Some(sequence) => Ok((epoch, sequence)),
        None => last
            .checked_add(1)
            .map(|next| (epoch, next))
            .ok_or_else(|| {
                anyhow!(
                    "`{name}`'s fleet record #{last} is at the end of the sequence range, so no \
                 record can follow it; start the sequence again with `--fleet --reset`"
                )
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_record_follows_the_current_one_in_its_epoch() {
        assert_eq!(next_place("app", None, None, false).unwrap(), (0, 1));
        assert_eq!(
            next_place("app", Some((0, 4)), None, false).unwrap(),
            (0, 5)
        );
        assert_eq!(
            next_place("app", Some((2, 4)), None, false).unwrap(),
            (2, 5)
        );
        assert_eq!(
            next_place("app", Some((2, 4)), Some(9), false).unwrap(),
            (2, 9)
        );
    }

    #[test]
    fn the_end_of_the_range_is_refused_not_wrapped_and_a_reset_gets_out() {
        let err = next_place("app", Some((0, u64::MAX)), None, false).unwrap_err();
        assert!(err.to_string().contains("--reset"), "{err}");
        assert_eq!(
            next_place("app", Some((0, u64::MAX)), None, true).unwrap(),
            (1, 1)
        );
        assert_eq!(
            next_place("app", Some((1, 7)), Some(3), true).unwrap(),
            (2, 3)
        );
        assert!(next_place("app", Some((u64::MAX, 1)), None, true).is_err());
    }
}
