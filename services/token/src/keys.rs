use std::{collections::HashMap, fmt, str::FromStr};

use base64::{
    Engine as _,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
};
use ed25519_dalek::pkcs8::{
    DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey,
    spki::der::pem::LineEnding,
};
use jsonwebtoken::{DecodingKey, EncodingKey};

use crate::TokenError;

/// A key id (`kid` header): 1–64 characters of `A-Z a-z 0-9 . _ -`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Kid(String);

impl Kid {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Kid {
    type Err = TokenError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok = (1..=64).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(TokenError::InvalidKey(format!(
                "kid must be 1-64 characters of A-Z a-z 0-9 . _ -, got {s:?}"
            )))
        }
    }
}

impl fmt::Display for Kid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An Ed25519 private key with its `kid`. Its `Debug` shows only the `kid`.
#[derive(Clone)]
pub struct SigningKey {
    kid: Kid,
    key: ed25519_dalek::SigningKey,
    encoding: EncodingKey,
}

impl SigningKey {
    pub fn generate(kid: Kid) -> Self {
        Self::from_dalek(
            kid,
            ed25519_dalek::SigningKey::generate(&mut rand_core::OsRng),
        )
    }

    /// Reads a PKCS#8 PEM (`BEGIN PRIVATE KEY`), or base64 of the 32-byte seed or of PKCS#8 DER.
    pub fn parse(kid: Kid, text: &str) -> Result<Self, TokenError> {
        let text = text.trim();
        let key = if text.starts_with("-----BEGIN") {
            ed25519_dalek::SigningKey::from_pkcs8_pem(text)
                .map_err(|e| TokenError::InvalidKey(format!("private key PEM: {e}")))?
        } else {
            let bytes = decode_base64(text)?;
            match <[u8; 32]>::try_from(bytes.as_slice()) {
                Ok(seed) => ed25519_dalek::SigningKey::from_bytes(&seed),
                Err(_) => ed25519_dalek::SigningKey::from_pkcs8_der(&bytes).map_err(|e| {
                    TokenError::InvalidKey(format!("private key is neither a seed nor PKCS#8: {e}"))
                })?,
            }
        };
        Ok(Self::from_dalek(kid, key))
    }

    fn from_dalek(kid: Kid, key: ed25519_dalek::SigningKey) -> Self {
        let der = key
            .to_pkcs8_der()
            .expect("encoding an in-memory Ed25519 key as PKCS#8 cannot fail");
        let encoding = EncodingKey::from_ed_der(der.as_bytes());
        Self { kid, key, encoding }
    }

    pub fn kid(&self) -> &Kid {
        &self.kid
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        VerifyingKey {
            kid: self.kid.clone(),
            key: self.key.verifying_key(),
        }
    }

    /// PKCS#8 PEM, for key files. Secret: never log it.
    pub fn to_pkcs8_pem(&self) -> String {
        self.key
            .to_pkcs8_pem(LineEnding::LF)
            .expect("encoding an in-memory Ed25519 key as PEM cannot fail")
            .to_string()
    }

    /// Standard base64 of the 32-byte seed, for environment variables. Secret: never log it.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.key.to_bytes())
    }

    pub(crate) fn encoding_key(&self) -> &EncodingKey {
        &self.encoding
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

/// An Ed25519 public key with its `kid`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyingKey {
    kid: Kid,
    key: ed25519_dalek::VerifyingKey,
}

impl VerifyingKey {
    /// Reads an SPKI PEM (`BEGIN PUBLIC KEY`), or base64 of the 32 raw bytes or of SPKI DER.
    pub fn parse(kid: Kid, text: &str) -> Result<Self, TokenError> {
        let text = text.trim();
        let key = if text.starts_with("-----BEGIN") {
            ed25519_dalek::VerifyingKey::from_public_key_pem(text)
                .map_err(|e| TokenError::InvalidKey(format!("public key PEM: {e}")))?
        } else {
            let bytes = decode_base64(text)?;
            match <[u8; 32]>::try_from(bytes.as_slice()) {
                Ok(raw) => ed25519_dalek::VerifyingKey::from_bytes(&raw)
                    .map_err(|e| TokenError::InvalidKey(format!("public key: {e}")))?,
                Err(_) => {
                    ed25519_dalek::VerifyingKey::from_public_key_der(&bytes).map_err(|e| {
                        TokenError::InvalidKey(format!("public key is neither raw nor SPKI: {e}"))
                    })?
                }
            }
        };
        Ok(Self { kid, key })
    }

    pub fn kid(&self) -> &Kid {
        &self.kid
    }

    pub fn to_public_key_pem(&self) -> String {
        self.key
            .to_public_key_pem(LineEnding::LF)
            .expect("encoding an in-memory Ed25519 public key as PEM cannot fail")
    }

    /// Standard base64 of the 32 raw bytes.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.key.as_bytes())
    }

    fn decoding_key(&self) -> DecodingKey {
        DecodingKey::from_ed_components(&URL_SAFE_NO_PAD.encode(self.key.as_bytes()))
            .expect("base64url of 32 bytes always decodes")
    }
}

/// The public keys a verifier accepts, by `kid`. Several at once is how keys rotate: publish the
/// new public key everywhere, then switch the signer to it, then drop the old one.
#[derive(Clone, Default)]
pub struct VerifyingKeys {
    /// By `kid` as it appears in token headers.
    keys: HashMap<String, DecodingKey>,
}

impl VerifyingKeys {
    pub fn new(keys: impl IntoIterator<Item = VerifyingKey>) -> Self {
        Self {
            keys: keys
                .into_iter()
                .map(|k| (k.kid.0.clone(), k.decoding_key()))
                .collect(),
        }
    }

    /// Reads `kid=KEY[,kid=KEY...]`, each KEY as [`VerifyingKey::parse`] takes it (PEM bodies
    /// have no commas, and only the first `=` separates the kid).
    pub fn parse_list(list: &str) -> Result<Self, TokenError> {
        let mut keys = Vec::new();
        for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (kid, key) = entry
                .split_once('=')
                .ok_or_else(|| TokenError::InvalidKey("each key must be written kid=KEY".into()))?;
            keys.push(VerifyingKey::parse(kid.trim().parse()?, key)?);
        }
        if keys.is_empty() {
            return Err(TokenError::InvalidKey("no verifying key given".into()));
        }
        Ok(Self::new(keys))
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn kids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    pub(crate) fn get(&self, kid: &str) -> Option<&DecodingKey> {
        self.keys.get(kid)
    }
}

impl fmt::Debug for VerifyingKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifyingKeys")
            .field("kids", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

fn decode_base64(text: &str) -> Result<Vec<u8>, TokenError> {
    let compact: String = text.split_whitespace().collect();
    STANDARD
        .decode(&compact)
        .or_else(|_| URL_SAFE_NO_PAD.decode(compact.trim_end_matches('=')))
        .map_err(|_| TokenError::InvalidKey("key is neither PEM nor base64".into()))
}
