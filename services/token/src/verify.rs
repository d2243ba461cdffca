use std::{fmt, marker::PhantomData};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, Header, Validation, errors::ErrorKind};
use serde::Deserialize;

use crate::{Claims, ISSUER, SigningKey, TokenError, VerifyingKeys};

/// Bounds the work a hostile token can cause before it is refused; ours are well under 1 KiB.
const MAX_TOKEN_LEN: usize = 8 * 1024;

impl SigningKey {
    /// Signs `claims` as an EdDSA JWT with this key's `kid` and the kind's `typ` in the header.
    /// A lifetime over the kind's maximum is refused here too: verifiers would refuse it.
    pub fn sign<C: Claims>(&self, claims: &C) -> Result<String, TokenError> {
        let (iat, exp) = claims.lifetime();
        if exp.saturating_sub(iat) > C::MAX_LIFETIME.as_secs() {
            return Err(TokenError::InvalidClaims(format!(
                "a lifetime over {} s",
                C::MAX_LIFETIME.as_secs()
            )));
        }
        let mut header = Header::new(Algorithm::EdDSA);
        header.typ = Some(C::TYPE.to_owned());
        header.kid = Some(self.kid().to_string());
        jsonwebtoken::encode(&header, claims, self.encoding_key()).map_err(|_| TokenError::Signing)
    }
}

/// Verifies tokens of one kind `C` offline against a set of public keys.
pub struct Verifier<C> {
    keys: VerifyingKeys,
    validation: Validation,
    claims: PhantomData<fn() -> C>,
}

impl<C> Clone for Verifier<C> {
    fn clone(&self) -> Self {
        Self {
            keys: self.keys.clone(),
            validation: self.validation.clone(),
            claims: PhantomData,
        }
    }
}

impl<C> fmt::Debug for Verifier<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("keys", &self.keys)
            .field("audience", &self.validation.aud)
            .field("leeway_s", &self.validation.leeway)
            .finish()
    }
}

/// What is read of the header before any cryptography, to refuse foreign algorithms, kinds and
/// extensions early.
#[derive(Deserialize)]
struct RawHeader {
    alg: String,
    kid: Option<String>,
    typ: Option<String>,
    /// Extensions the verifier must understand (RFC 7515 §4.1.11): follow understands none.
    crit: Option<serde_json::Value>,
}

impl<C: Claims> Verifier<C> {
    /// A verifier for `C::AUDIENCE` tokens issued by follow-api, with 5 s of clock leeway.
    pub fn new(keys: VerifyingKeys) -> Self {
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_audience(&[C::AUDIENCE]);
        validation.set_issuer(&[ISSUER]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = 5;
        Self {
            keys,
            validation,
            claims: PhantomData,
        }
    }

    /// Clock skew tolerated on `exp`, in seconds.
    pub fn with_leeway(mut self, seconds: u64) -> Self {
        self.validation.leeway = seconds;
        self
    }

    pub fn verify(&self, token: &str) -> Result<C, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed);
        }
        let header = read_header(token)?;
        if header.alg != "EdDSA" {
            return Err(TokenError::UnsupportedAlgorithm);
        }
        if header.typ.as_deref() != Some(C::TYPE) {
            return Err(TokenError::WrongType);
        }
        if header.crit.is_some() {
            return Err(TokenError::InvalidClaims(
                "critical header extensions are not supported".into(),
            ));
        }
        let kid = header.kid.ok_or(TokenError::MissingKid)?;
        let key = self.keys.get(&kid).ok_or(TokenError::UnknownKid)?;
        // Registered claims (signature, exp, aud, iss, presence) are judged before the claims are
        // read as `C`, so a token for another audience is "wrong audience", not "bad shape".
        let data = jsonwebtoken::decode::<serde_json::Value>(token, key, &self.validation)
            .map_err(map_error)?;
        let claims: C = serde_json::from_value(data.claims)
            .map_err(|e| TokenError::InvalidClaims(e.to_string()))?;
        let (iat, exp) = claims.lifetime();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if iat > now.saturating_add(self.validation.leeway) {
            return Err(TokenError::InvalidClaims("issued in the future".into()));
        }
        if exp.saturating_sub(iat) > C::MAX_LIFETIME.as_secs() {
            return Err(TokenError::InvalidClaims(format!(
                "lives longer than {} s",
                C::MAX_LIFETIME.as_secs()
            )));
        }
        claims.check()?;
        Ok(claims)
    }
}

fn read_header(token: &str) -> Result<RawHeader, TokenError> {
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed);
    };
    let json = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| TokenError::Malformed)?;
    serde_json::from_slice(&json).map_err(|_| TokenError::Malformed)
}

fn map_error(e: jsonwebtoken::errors::Error) -> TokenError {
    match e.into_kind() {
        ErrorKind::InvalidSignature => TokenError::BadSignature,
        ErrorKind::ExpiredSignature => TokenError::Expired,
        ErrorKind::InvalidAudience => TokenError::WrongAudience,
        ErrorKind::InvalidIssuer => TokenError::WrongIssuer,
        ErrorKind::MissingRequiredClaim(claim) => TokenError::MissingClaim(claim),
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
            TokenError::UnsupportedAlgorithm
        }
        ErrorKind::Json(e) => TokenError::InvalidClaims(e.to_string()),
        ErrorKind::ImmatureSignature => TokenError::InvalidClaims("token is not valid yet".into()),
        _ => TokenError::Malformed,
    }
}
