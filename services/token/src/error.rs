use thiserror::Error;

/// Why a key could not be read or a token was refused.
///
/// Messages are safe to show a client: they never carry key material or the token itself.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TokenError {
    #[error("token is malformed")]
    Malformed,
    #[error("token algorithm is not EdDSA")]
    UnsupportedAlgorithm,
    #[error("token header has no kid")]
    MissingKid,
    #[error("token is signed with an unknown key")]
    UnknownKid,
    #[error("token signature is invalid")]
    BadSignature,
    #[error("token has expired")]
    Expired,
    #[error("token is not meant for this service")]
    WrongAudience,
    #[error("token is of another kind")]
    WrongType,
    #[error("token was not issued by follow-api")]
    WrongIssuer,
    #[error("token lacks the claim `{0}`")]
    MissingClaim(String),
    #[error("token claims are invalid: {0}")]
    InvalidClaims(String),
    #[error("invalid key: {0}")]
    InvalidKey(String),
    #[error("could not sign the token")]
    Signing,
}

impl TokenError {
    /// Expiry is the one refusal a client can act on (ask for a new token); everything else is
    /// "this token is not valid".
    pub fn is_expired(&self) -> bool {
        matches!(self, Self::Expired)
    }
}
