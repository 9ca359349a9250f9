//! Signed manifests and fleet activation records: one envelope, [`Signed`], for both. An
//! operator key (ed25519) signs the canonical encoding of what it holds (a record's is prefixed,
//! so neither can pass for the other); a node accepts either only if its signature verifies
//! against a key it trusts.

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::path::Path;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use edged_artifacts::Manifest;
use serde::de::{self, DeserializeOwned, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::ser::SerializeStruct;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

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

/// What an operator key signs.
pub trait Signable: Serialize + DeserializeOwned {
    /// The key that holds it in its envelope's encoding (`manifest`, `record`): each kind kept
    /// the name it had before the envelope was shared, so stored and sent envelopes still read.
    const FIELD: &'static str;
    /// The bytes the signature covers.
    fn canonical_bytes(&self) -> Vec<u8>;
    /// How logs and errors name it.
    fn id(&self) -> String;
}

/// Something signed, with its signer's key id and signature (`signature` is empty when
/// unsigned). Encoded as `{FIELD: payload, "signer": …, "signature": …}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed<T> {
    pub payload: T,
    pub signer: String,
    pub signature: String,
}

/// A manifest with its signature: what a push offers and a node stores.
pub type SignedManifest = Signed<Manifest>;
/// A fleet activation record with its signature: what sync spreads.
pub type SignedActivation = Signed<ActivationRecord>;

/// A manifest's canonical bytes: its JSON, fields in declaration order, no whitespace.
impl Signable for Manifest {
    const FIELD: &'static str = "manifest";

    fn canonical_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("manifests serialize")
    }

    fn id(&self) -> String {
        Manifest::id(self)
    }
}

/// Short, stable id of a public key: the first 16 hex digits of its BLAKE3.
pub fn key_id(key: &VerifyingKey) -> String {
    hex::encode(&blake3::hash(key.as_bytes()).as_bytes()[..8])
}

impl<T: Signable> Signed<T> {
    pub fn sign(payload: T, key: &SigningKey) -> Signed<T> {
        let signature = key.sign(&payload.canonical_bytes());
        Signed {
            payload,
            signer: key_id(&key.verifying_key()),
            signature: hex::encode(signature.to_bytes()),
        }
    }

    /// Checks the signature against `trusted`.
    pub fn verify(&self, trusted: &TrustedKeys) -> Result<(), SignError> {
        let id = self.payload.id();
        if self.signature.is_empty() || self.signer.is_empty() {
            return Err(SignError::Unsigned(id));
        }
        let key = trusted
            .keys
            .get(&self.signer)
            .ok_or_else(|| SignError::UnknownKey {
                id: id.clone(),
                key_id: self.signer.clone(),
            })?;
        let raw: [u8; 64] = hex::decode(&self.signature)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| SignError::BadSignature(id.clone()))?;
        key.verify(
            &self.payload.canonical_bytes(),
            &Signature::from_bytes(&raw),
        )
        .map_err(|_| SignError::BadSignature(id))
    }
}

/// Written by hand only because the payload's key depends on `T`; the encoding is what
/// `#[derive(Serialize)]` gave each kind before: payload, signer, signature, in that order.
impl<T: Signable> Serialize for Signed<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut envelope = serializer.serialize_struct("Signed", 3)?;
        envelope.serialize_field(T::FIELD, &self.payload)?;
        envelope.serialize_field("signer", &self.signer)?;
        envelope.serialize_field("signature", &self.signature)?;
        envelope.end()
    }
}

/// As `#[derive(Deserialize)]` read each kind before: a map (or a sequence in field order), all
/// three fields required, unknown keys ignored.
impl<'de, T: Signable> Deserialize<'de> for Signed<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EnvelopeVisitor<T>(PhantomData<T>);

        impl<'de, T: Signable> Visitor<'de> for EnvelopeVisitor<T> {
            type Value = Signed<T>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a signed {}", T::FIELD)
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Signed<T>, A::Error> {
                let payload = seq
                    .next_element()?
                    .ok_or_else(|| de::Error::invalid_length(0, &self))?;
                let signer = seq
                    .next_element()?
                    .ok_or_else(|| de::Error::invalid_length(1, &self))?;
                let signature = seq
                    .next_element()?
                    .ok_or_else(|| de::Error::invalid_length(2, &self))?;
                Ok(Signed {
                    payload,
                    signer,
                    signature,
                })
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Signed<T>, A::Error> {
                let (mut payload, mut signer, mut signature) = (None, None, None);
                while let Some(key) = map.next_key::<String>()? {
                    let duplicate = match key.as_str() {
                        k if k == T::FIELD => payload.replace(map.next_value()?).is_some(),
                        "signer" => signer.replace(map.next_value()?).is_some(),
                        "signature" => signature.replace(map.next_value()?).is_some(),
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                            false
                        }
                    };
                    if duplicate {
                        return Err(de::Error::custom(format_args!("duplicate field `{key}`")));
                    }
                }
                Ok(Signed {
                    payload: payload.ok_or_else(|| de::Error::missing_field(T::FIELD))?,
                    signer: signer.ok_or_else(|| de::Error::missing_field("signer"))?,
                    signature: signature.ok_or_else(|| de::Error::missing_field("signature"))?,
                })
            }
        }

        deserializer.deserialize_struct(
            "Signed",
            &[T::FIELD, "signer", "signature"],
            EnvelopeVisitor(PhantomData),
        )
    }
}

/// A fleet-wide activation: every node that holds `name@version` serves it. Records of a name
/// are ordered by `(epoch, sequence)`; a node applies one only if it is newer than the last it
/// applied, so a replayed older record cannot roll the fleet back. A new `epoch` is the
/// operator's signed way out of a sequence that went wrong (`edgectl activate --fleet
/// --reset`): its sequence starts again from scratch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActivationRecord {
    pub name: String,
    pub version: u64,
    pub sequence: u64,
    /// Seconds since the Unix epoch, for operators reading it.
    pub created_at: u64,
    /// How many times the name's sequence was reset. Left out of the encoding while 0, so a
    /// record signed before resets existed keeps its canonical bytes (and its signature).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub epoch: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl ActivationRecord {
    /// `name@version #sequence` (`#sequence/epoch` after a reset), for logs and errors.
    pub fn id(&self) -> String {
        format!(
            "{}@{} #{}",
            self.name,
            self.version,
            sequence_label(self.epoch, self.sequence)
        )
    }
}

/// A record's place in its name's order as operators read it: `5`, or `5/1` in epoch 1.
pub fn sequence_label(epoch: u64, sequence: u64) -> String {
    if epoch == 0 {
        sequence.to_string()
    } else {
        format!("{sequence}/{epoch}")
    }
}

/// A record's canonical bytes: its JSON behind a prefix no manifest's JSON starts with.
impl Signable for ActivationRecord {
    const FIELD: &'static str = "record";

    fn canonical_bytes(&self) -> Vec<u8> {
        let mut bytes = b"edged-activation-record\0".to_vec();
        bytes.extend(serde_json::to_vec(self).expect("records serialize"));
        bytes
    }

    fn id(&self) -> String {
        ActivationRecord::id(self)
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
            epoch: 0,
        };
        let signed = SignedActivation::sign(record.clone(), &key);
        assert_eq!(signed.verify(&trusted), Ok(()));
        let mut older = signed.clone();
        older.payload.sequence = 4;
        assert!(matches!(
            older.verify(&trusted),
            Err(SignError::BadSignature(_))
        ));
        // The same key over a manifest's bytes is not a record's signature.
        let manifest_signed = SignedManifest::sign(Manifest::sample("app", 2), &key);
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
        let signed = SignedManifest::sign(Manifest::sample("app", 2), &key);
        signed.verify(&trusted).unwrap();

        let mut altered = signed.clone();
        altered.payload.version = 3;
        assert_eq!(
            altered.verify(&trusted),
            Err(SignError::BadSignature("app@3".into()))
        );

        let stranger = generate_signing_key();
        let foreign = SignedManifest::sign(Manifest::sample("app", 2), &stranger);
        assert!(matches!(
            foreign.verify(&trusted),
            Err(SignError::UnknownKey { .. })
        ));

        let unsigned = SignedManifest {
            payload: Manifest::sample("app", 2),
            signer: String::new(),
            signature: String::new(),
        };
        assert_eq!(
            unsigned.verify(&trusted),
            Err(SignError::Unsigned("app@2".into()))
        );

        // A valid signature from a trusted key over other bytes is still rejected.
        let mut swapped = SignedManifest::sign(Manifest::sample("app", 2), &key);
        swapped.signature = foreign.signature.clone();
        assert!(matches!(
            swapped.verify(&trusted),
            Err(SignError::BadSignature(_))
        ));
    }

    /// Envelopes as the two structs before [`Signed`] encoded and signed them (key seed
    /// `[7; 32]`; ed25519 signatures are deterministic).
    const MANIFEST_SIGNED_BEFORE: &str = concat!(
        r#"{"manifest":{"name":"app","version":2,"created_at":1,"kind":"module","source":{"blake3":"#,
        r#""aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","size":10},"init_func"#,
        r#"":null,"artifacts":[{"target":"x86_64-unknown-linux-gnu","fingerprint":"f","blake3":"bbb"#,
        r#"bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb","size":20}],"route":"/app"#,
        r#"","limits":null},"signer":"0871f3aabc26e458","signature":"ac93a1d64c7cb45023df776f192558"#,
        r#"4766a4f28c69d38643432b9065d063a7665c1a95f0d143bf8add61a1e1d5ff2c0169b9bf5081fa831f441e0b"#,
        r#"47511ce907"}"#,
    );
    const RECORD_SIGNED_BEFORE: &str = concat!(
        r#"{"record":{"name":"app","version":2,"sequence":5,"created_at":9},"signer":"0871f3aabc26e"#,
        r#"458","signature":"efb5b29ffa8e59abb5dde080ca20250d51a8ca032ba7d89c1a74f65e3c0bfd9a073f5b"#,
        r#"c1c073a52c2833cce9294107e6578fd3287cd1b55a78773a5437d9c209"}"#,
    );

    #[test]
    fn envelopes_signed_before_the_shared_envelope_verify_and_encode_the_same() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let mut trusted = TrustedKeys::default();
        trusted.add(key.verifying_key());

        let manifest: SignedManifest = serde_json::from_str(MANIFEST_SIGNED_BEFORE).unwrap();
        assert_eq!(manifest.verify(&trusted), Ok(()));
        assert_eq!(manifest.payload.id(), "app@2");
        assert_eq!(
            serde_json::to_string(&manifest).unwrap(),
            MANIFEST_SIGNED_BEFORE
        );
        assert_eq!(
            SignedManifest::sign(manifest.payload.clone(), &key),
            manifest
        );

        let record: SignedActivation = serde_json::from_str(RECORD_SIGNED_BEFORE).unwrap();
        assert_eq!(record.verify(&trusted), Ok(()));
        assert_eq!(
            serde_json::to_string(&record).unwrap(),
            RECORD_SIGNED_BEFORE
        );
        assert_eq!(SignedActivation::sign(record.payload.clone(), &key), record);

        // Each envelope reads only its own kind's key.
        let err = serde_json::from_str::<SignedManifest>(RECORD_SIGNED_BEFORE).unwrap_err();
        assert!(
            err.to_string().contains("missing field `manifest`"),
            "{err}"
        );
        let record = r#"{"name":"a","version":1,"sequence":1,"created_at":0}"#;
        let twice = format!(r#"{{"record":{record},"signer":"a","signer":"b","signature":""}}"#);
        let err = serde_json::from_str::<SignedActivation>(&twice).unwrap_err();
        assert!(
            err.to_string().contains("duplicate field `signer`"),
            "{err}"
        );
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
