//! Signed decisions. The service signs every message it publishes on the decisions topic with
//! an Ed25519 key (RFC 8032); enforcement points verify it against the public keys they trust,
//! so that write access to the topic is not enough to block or free anyone.
//!
//! What is signed, exactly: the bytes [`CONTEXT`] followed by the message's value as published
//! (the decision's JSON, byte for byte; nothing is re-serialised or canonicalised, so verifying
//! needs no JSON parser and any change to the value breaks the signature). Two headers travel
//! with the message: [`KEY_ID_HEADER`] (which key signed, so keys can be rotated with overlap)
//! and [`SIGNATURE_HEADER`] (the 64-byte signature in standard base64 with padding).
//!
//! Keys are PEM files as OpenSSL writes them: the private key PKCS#8
//! (`openssl genpkey -algorithm ed25519`), the public key SPKI (`openssl pkey -pubout`), or as
//! `rampart keys generate` writes them.

use std::collections::BTreeMap;
use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{
    DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey, KeypairBytes,
};
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};

/// The header naming the key that signed a message.
pub const KEY_ID_HEADER: &str = "rampart.key_id";
/// The header carrying the signature (standard base64 of 64 bytes).
pub const SIGNATURE_HEADER: &str = "rampart.signature";
/// Signed before the message's value: a signature made for something else (with the same key)
/// is never a valid decision signature.
pub const CONTEXT: &[u8] = b"rampart decision v1\0";

/// Why a key could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyError(String);

impl std::fmt::Display for KeyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for KeyError {}

/// Checks a key id: 1 to 64 characters of letters, digits, `.`, `_` and `-`.
pub fn check_key_id(id: &str) -> Result<(), KeyError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(KeyError(format!(
            "key id `{id}`: use 1 to 64 letters, digits, `.`, `_` or `-`"
        )))
    }
}

fn read(path: &Path) -> Result<String, KeyError> {
    std::fs::read_to_string(path).map_err(|e| KeyError(format!("cannot read {}: {e}", path.display())))
}

/// A private signing key with its id.
#[derive(Clone)]
pub struct Signer {
    id: String,
    key: SigningKey,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key itself.
        f.debug_struct("Signer")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// The key of a PKCS#8 PEM text (`-----BEGIN PRIVATE KEY-----`).
    pub fn from_pem(id: &str, pem: &str) -> Result<Self, KeyError> {
        check_key_id(id)?;
        let key = SigningKey::from_pkcs8_pem(pem.trim()).map_err(|e| {
            KeyError(format!(
                "key `{id}` is not an Ed25519 private key in PKCS#8 PEM: {e}"
            ))
        })?;
        Ok(Self { id: id.into(), key })
    }

    /// The key of a PKCS#8 PEM file.
    pub fn read(id: &str, path: &Path) -> Result<Self, KeyError> {
        Self::from_pem(id, &read(path)?).map_err(|e| KeyError(format!("{}: {e}", path.display())))
    }

    /// The key of a 32-byte secret seed (RFC 8032's private key).
    pub fn from_seed(id: &str, seed: &[u8; 32]) -> Result<Self, KeyError> {
        check_key_id(id)?;
        Ok(Self {
            id: id.into(),
            key: SigningKey::from_bytes(seed),
        })
    }

    /// Its id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The private key as PKCS#8 PEM (to store with permissions only its owner can read). The
    /// version 1 form, without the public key, which OpenSSL reads too.
    pub fn private_pem(&self) -> Result<String, KeyError> {
        KeypairBytes {
            secret_key: self.key.to_bytes(),
            public_key: None,
        }
        .to_pkcs8_pem(LineEnding::LF)
        .map(|pem| pem.to_string())
        .map_err(|e| KeyError(format!("cannot encode the key: {e}")))
    }

    /// The public key as SPKI PEM, for the enforcement points.
    pub fn public_pem(&self) -> Result<String, KeyError> {
        self.key
            .verifying_key()
            .to_public_key_pem(LineEnding::LF)
            .map_err(|e| KeyError(format!("cannot encode the public key: {e}")))
    }

    /// The signature of a message whose value is `payload`, as the header carries it.
    pub fn sign(&self, payload: &[u8]) -> String {
        let mut signed = Vec::with_capacity(CONTEXT.len() + payload.len());
        signed.extend_from_slice(CONTEXT);
        signed.extend_from_slice(payload);
        STANDARD.encode(self.key.sign(&signed).to_bytes())
    }
}

/// Why a message was not accepted as a signed decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unverified {
    /// It has no signature or no key id.
    Unsigned,
    /// It names a key this verifier does not trust.
    UnknownKey(String),
    /// The signature does not decode, or does not match the value.
    BadSignature,
}

impl std::fmt::Display for Unverified {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unsigned => f.write_str("not signed"),
            Self::UnknownKey(id) => write!(f, "signed with key `{id}`, which is not trusted"),
            Self::BadSignature => f.write_str("the signature does not match the message"),
        }
    }
}

/// The public keys an enforcement point trusts, by id (several during a rotation).
#[derive(Debug, Clone, Default)]
pub struct Verifier {
    keys: BTreeMap<String, VerifyingKey>,
}

impl Verifier {
    /// Trusts no key yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Trusts the key of an SPKI PEM text (`-----BEGIN PUBLIC KEY-----`) under `id`.
    pub fn trust_pem(&mut self, id: &str, pem: &str) -> Result<&mut Self, KeyError> {
        check_key_id(id)?;
        let key = VerifyingKey::from_public_key_pem(pem.trim()).map_err(|e| {
            KeyError(format!(
                "key `{id}` is not an Ed25519 public key in SPKI PEM: {e}"
            ))
        })?;
        self.keys.insert(id.into(), key);
        Ok(self)
    }

    /// Trusts the key of an SPKI PEM file under `id`.
    pub fn trust_file(&mut self, id: &str, path: &Path) -> Result<&mut Self, KeyError> {
        let pem = read(path)?;
        self.trust_pem(id, &pem)
            .map_err(|e| KeyError(format!("{}: {e}", path.display())))
    }

    /// The ids of the trusted keys.
    pub fn key_ids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    /// Checks a message: its value and its two headers' values, if present.
    pub fn verify(
        &self,
        payload: &[u8],
        key_id: Option<&[u8]>,
        signature: Option<&[u8]>,
    ) -> Result<(), Unverified> {
        let (Some(key_id), Some(signature)) = (key_id, signature) else {
            return Err(Unverified::Unsigned);
        };
        let id = String::from_utf8_lossy(key_id);
        let Some(key) = self.keys.get(id.as_ref()) else {
            return Err(Unverified::UnknownKey(id.chars().take(64).collect()));
        };
        let bytes = STANDARD.decode(signature).map_err(|_| Unverified::BadSignature)?;
        let signature = Signature::from_slice(&bytes).map_err(|_| Unverified::BadSignature)?;
        let mut signed = Vec::with_capacity(CONTEXT.len() + payload.len());
        signed.extend_from_slice(CONTEXT);
        signed.extend_from_slice(payload);
        // (`verify_strict`: no malleable or small-order signatures.)
        key.verify_strict(&signed, &signature)
            .map_err(|_| Unverified::BadSignature)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer(id: &str, byte: u8) -> Signer {
        Signer::from_seed(id, &[byte; 32]).expect("a key")
    }

    fn trusting(signers: &[&Signer]) -> Verifier {
        let mut v = Verifier::new();
        for s in signers {
            v.trust_pem(s.id(), &s.public_pem().expect("pem"))
                .expect("trusted");
        }
        v
    }

    #[test]
    fn a_signed_value_verifies_and_any_change_breaks_it() {
        let k1 = signer("k1", 1);
        let v = trusting(&[&k1]);
        let payload = br#"{"verdict":"block","actor":"mallory"}"#;
        let sig = k1.sign(payload);
        assert_eq!(v.verify(payload, Some(b"k1"), Some(sig.as_bytes())), Ok(()));
        let altered = br#"{"verdict":"block","actor":"alice!!"}"#;
        assert_eq!(
            v.verify(altered, Some(b"k1"), Some(sig.as_bytes())),
            Err(Unverified::BadSignature)
        );
        assert_eq!(v.verify(payload, None, None), Err(Unverified::Unsigned));
        assert_eq!(v.verify(payload, Some(b"k1"), None), Err(Unverified::Unsigned));
        assert_eq!(
            v.verify(payload, Some(b"k1"), Some(b"not base64!")),
            Err(Unverified::BadSignature)
        );
        // The plain Ed25519 signature of the value (without the context) is not accepted.
        let plain = STANDARD.encode(k1.key.sign(payload).to_bytes());
        assert_eq!(
            v.verify(payload, Some(b"k1"), Some(plain.as_bytes())),
            Err(Unverified::BadSignature)
        );
    }

    #[test]
    fn a_key_not_trusted_is_refused_and_two_keys_overlap_during_a_rotation() {
        let (k1, k2, other) = (signer("k1", 1), signer("k2", 2), signer("k1", 3));
        let v = trusting(&[&k1, &k2]);
        let payload = b"{}";
        for k in [&k1, &k2] {
            assert_eq!(
                v.verify(payload, Some(k.id().as_bytes()), Some(k.sign(payload).as_bytes())),
                Ok(())
            );
        }
        // Another key calling itself k1.
        assert_eq!(
            v.verify(payload, Some(b"k1"), Some(other.sign(payload).as_bytes())),
            Err(Unverified::BadSignature)
        );
        let k3 = signer("k3", 4);
        assert_eq!(
            v.verify(payload, Some(b"k3"), Some(k3.sign(payload).as_bytes())),
            Err(Unverified::UnknownKey("k3".into()))
        );
    }

    #[test]
    fn keys_round_trip_through_pem_and_bad_ids_and_keys_are_refused() {
        let k = signer("prod-2026.1", 7);
        let pem = k.private_pem().expect("pem");
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"), "{pem}");
        let again = Signer::from_pem("prod-2026.1", &pem).expect("reads back");
        assert_eq!(again.sign(b"x"), k.sign(b"x"));
        assert!(
            k.public_pem()
                .expect("pem")
                .starts_with("-----BEGIN PUBLIC KEY-----")
        );
        assert!(check_key_id("").is_err());
        assert!(check_key_id("a b").is_err());
        assert!(check_key_id(&"x".repeat(65)).is_err());
        let err = Signer::from_pem(
            "k",
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .expect_err("not a key");
        assert!(err.to_string().contains("PKCS#8"), "{err}");
        let err = Verifier::new()
            .trust_pem("k", &pem)
            .expect_err("a private key is not a public key");
        assert!(err.to_string().contains("SPKI"), "{err}");
        assert!(
            !format!("{k:?}").contains(&pem[30..40]),
            "Debug never shows the key"
        );
    }

    /// A key made by `openssl genpkey -algorithm ed25519`, and the signature OpenSSL made of
    /// the context and `{"x":1}` (`openssl pkeyutl -sign -rawin`): what is signed can be
    /// checked, and made, without Rampart.
    #[test]
    fn openssl_keys_and_signatures_are_interchangeable() {
        const PRIVATE: &str = "-----BEGIN PRIVATE KEY-----\n\
            MC4CAQAwBQYDK2VwBCIEIHOSJm+8+ED5gKZZTz7oWQj0mnBPoo6vCJ4VQCVb8nwa\n\
            -----END PRIVATE KEY-----\n";
        const PUBLIC: &str = "-----BEGIN PUBLIC KEY-----\n\
            MCowBQYDK2VwAyEAhhsIZeL5nQuaDSw3dnabWNYSEZqkOiPo9tvQZn8Wc2U=\n\
            -----END PUBLIC KEY-----\n";
        const SIGNATURE: &str =
            "6arutTu6RuoYT6r/rx7De+H63/+2SzoKN+hB3BgQ/AeuOe9R8/p11bzWVf+L3ElGq6dwVKoEom8IhdQy5OBbAg==";
        let signer = Signer::from_pem("ossl", PRIVATE).expect("OpenSSL's key reads");
        assert_eq!(signer.public_pem().expect("pem"), PUBLIC);
        assert_eq!(signer.sign(br#"{"x":1}"#), SIGNATURE, "Ed25519 is deterministic");
        let mut v = Verifier::new();
        v.trust_pem("ossl", PUBLIC).expect("OpenSSL's public key reads");
        assert_eq!(
            v.verify(br#"{"x":1}"#, Some(b"ossl"), Some(SIGNATURE.as_bytes())),
            Ok(())
        );
    }
}
