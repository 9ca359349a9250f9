//! Signed manifests and fleet activation records. An operator key (ed25519) signs the
//! canonical encoding of a manifest (or of an activation record, prefixed so neither can pass
//! for the other); a node accepts either only if its signature verifies against a key it trusts.

use std::collections::BTreeMap;
use std::path::Path;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use edged_snapshots::Manifest;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignError {
    #[error("{0} is not signed")]
    Unsigned(String),
    #[error("{id} is signed by key {key_id}, which this node does not trust")]
    UnknownKey { id: String, key_id: String },
    #[error("{0} has a bad signature (altered after signing, or signed by another key)")]
    BadSignature(String),
    #[error("{0}")]
    Key(String),
}

/// A manifest with its signer's key id and signature. `signature` is empty when unsigned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedManifest {
    pub manifest: Manifest,
    pub signer: String,
    pub signature: String,
}

/// Bytes that are signed: the manifest's JSON, fields in declaration order, no whitespace.
pub fn canonical_bytes(manifest: &Manifest) -> Vec<u8> {
    serde_json::to_vec(manifest).expect("manifests serialize")
}

/// Short, stable id of a public key: the first 16 hex digits of its BLAKE3.
pub fn key_id(key: &VerifyingKey) -> String {
    hex::encode(&blake3::hash(key.as_bytes()).as_bytes()[..8])
}

impl SignedManifest {
    pub fn sign(manifest: Manifest, key: &SigningKey) -> SignedManifest {
        let signature = key.sign(&canonical_bytes(&manifest));
        SignedManifest {
            manifest,
            signer: key_id(&key.verifying_key()),
            signature: hex::encode(signature.to_bytes()),
        }
    }

    /// Checks the signature against `trusted`.
    pub fn verify(&self, trusted: &TrustedKeys) -> Result<(), SignError> {
        verify_signature(
            trusted,
            &self.signer,
            &self.signature,
            &canonical_bytes(&self.manifest),
            self.manifest.id(),
        )
    }
}

/// `signature` by key `signer` over `bytes`, checked against `trusted`; `id` names the signed
/// thing in errors.
fn verify_signature(
    trusted: &TrustedKeys,
    signer: &str,
    signature: &str,
    bytes: &[u8],
    id: String,
) -> Result<(), SignError> {
    if signature.is_empty() || signer.is_empty() {
        return Err(SignError::Unsigned(id));
    }
    let key = trusted
        .keys
        .get(signer)
        .ok_or_else(|| SignError::UnknownKey {
            id: id.clone(),
            key_id: signer.to_string(),
        })?;
    let raw: [u8; 64] = hex::decode(signature)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| SignError::BadSignature(id.clone()))?;
    key.verify(bytes, &Signature::from_bytes(&raw))
        .map_err(|_| SignError::BadSignature(id))
}

/// A fleet-wide activation: every node that holds `name@version` serves it. Records of a name
/// are ordered by `sequence`; a node applies one only if it is newer than the last it applied,
/// so a replayed older record cannot roll the fleet back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActivationRecord {
    pub name: String,
    pub version: u64,
    pub sequence: u64,
    /// Seconds since the Unix epoch, for operators reading it.
    pub created_at: u64,
}

impl ActivationRecord {
    /// `name@version #sequence`, for logs and errors.
    pub fn id(&self) -> String {
        format!("{}@{} #{}", self.name, self.version, self.sequence)
    }

    fn signed_bytes(&self) -> Vec<u8> {
        let mut bytes = b"edged-activation-record\0".to_vec();
        bytes.extend(serde_json::to_vec(self).expect("records serialize"));
        bytes
    }
}

/// An activation record with its signer's key id and signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedActivation {
    pub record: ActivationRecord,
    pub signer: String,
    pub signature: String,
}

impl SignedActivation {
    pub fn sign(record: ActivationRecord, key: &SigningKey) -> SignedActivation {
        let signature = key.sign(&record.signed_bytes());
        SignedActivation {
            record,
            signer: key_id(&key.verifying_key()),
            signature: hex::encode(signature.to_bytes()),
        }
    }

    pub fn verify(&self, trusted: &TrustedKeys) -> Result<(), SignError> {
        verify_signature(
            trusted,
            &self.signer,
            &self.signature,
            &self.record.signed_bytes(),
            self.record.id(),
        )
    }
}

/// Operator keys a node trusts, by key id.
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys {
    keys: BTreeMap<String, VerifyingKey>,
}

impl TrustedKeys {
    pub fn add(&mut self, key: VerifyingKey) {
        self.keys.insert(key_id(&key), key);
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Adds a public key file written by [`write_signing_key`] (`<hex>` on one line).
    pub fn add_file(&mut self, path: &Path) -> Result<(), SignError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| SignError::Key(format!("reading {}: {e}", path.display())))?;
        self.add(
            parse_public_key(text.trim())
                .map_err(|e| SignError::Key(format!("{}: {e}", path.display())))?,
        );
        Ok(())
    }
}

pub fn parse_public_key(hex_text: &str) -> Result<VerifyingKey, String> {
    let bytes: [u8; 32] = hex::decode(hex_text)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or("not a 32-byte hex ed25519 public key")?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| e.to_string())
}

pub fn generate_signing_key() -> SigningKey {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).expect("the OS provides randomness");
    SigningKey::from_bytes(&seed)
}

pub fn signing_key_to_hex(key: &SigningKey) -> String {
    hex::encode(key.to_bytes())
}

pub fn signing_key_from_hex(text: &str) -> Result<SigningKey, String> {
    let bytes: [u8; 32] = hex::decode(text.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or("not a 32-byte hex ed25519 signing key")?;
    Ok(SigningKey::from_bytes(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use edged_compiler::{Target, WasmKind};
    use edged_snapshots::{ArtifactRef, BlobRef};

    fn manifest() -> Manifest {
        Manifest {
            name: "app".into(),
            version: 2,
            created_at: 1,
            kind: WasmKind::Module,
            source: BlobRef {
                blake3: "aa".repeat(32),
                size: 10,
            },
            init_func: None,
            artifacts: vec![ArtifactRef {
                target: Target::X86_64Linux,
                fingerprint: "f".into(),
                blake3: "bb".repeat(32),
                size: 20,
            }],
            route: None,
            limits: None,
            memory_image: None,
            guest: None,
            instances: None,
            parts: None,
        }
    }

    #[test]
    fn activation_records_verify_and_cannot_be_altered_or_pass_for_a_manifest() {
        let key = generate_signing_key();
        let mut trusted = TrustedKeys::default();
        trusted.add(key.verifying_key());
        let record = ActivationRecord {
            name: "app".into(),
            version: 1,
            sequence: 3,
            created_at: 9,
        };
        let signed = SignedActivation::sign(record.clone(), &key);
        assert_eq!(signed.verify(&trusted), Ok(()));
        let mut older = signed.clone();
        older.record.sequence = 4;
        assert!(matches!(
            older.verify(&trusted),
            Err(SignError::BadSignature(_))
        ));
        // The same key over a manifest's bytes is not a record's signature.
        let manifest_signed = SignedManifest::sign(manifest(), &key);
        let forged = SignedActivation {
            signature: manifest_signed.signature,
            ..signed.clone()
        };
        assert!(forged.verify(&trusted).is_err());
        assert!(matches!(
            signed.verify(&TrustedKeys::default()),
            Err(SignError::UnknownKey { .. })
        ));
    }

    #[test]
    fn sign_and_verify() {
        let key = generate_signing_key();
        let mut trusted = TrustedKeys::default();
        trusted.add(key.verifying_key());
        let signed = SignedManifest::sign(manifest(), &key);
        signed.verify(&trusted).unwrap();

        let mut altered = signed.clone();
        altered.manifest.version = 3;
        assert_eq!(
            altered.verify(&trusted),
            Err(SignError::BadSignature("app@3".into()))
        );

        let stranger = generate_signing_key();
        let foreign = SignedManifest::sign(manifest(), &stranger);
        assert!(matches!(
            foreign.verify(&trusted),
            Err(SignError::UnknownKey { .. })
        ));

        let unsigned = SignedManifest {
            manifest: manifest(),
            signer: String::new(),
            signature: String::new(),
        };
        assert_eq!(
            unsigned.verify(&trusted),
            Err(SignError::Unsigned("app@2".into()))
        );

        // A valid signature from a trusted key over other bytes is still rejected.
        let mut swapped = SignedManifest::sign(manifest(), &key);
        swapped.signature = foreign.signature.clone();
        assert!(matches!(
            swapped.verify(&trusted),
            Err(SignError::BadSignature(_))
        ));
    }

    #[test]
    fn keys_round_trip_as_hex() {
        let key = generate_signing_key();
        let back = signing_key_from_hex(&signing_key_to_hex(&key)).unwrap();
        assert_eq!(back.to_bytes(), key.to_bytes());
        let public = parse_public_key(&hex::encode(key.verifying_key().as_bytes())).unwrap();
        assert_eq!(key_id(&public), key_id(&key.verifying_key()));
    }
}
