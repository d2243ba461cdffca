//! Who is calling: the `sub` of the `authorization: Bearer <user JWT>` metadata, verified offline
//! with the configured public keys (EdDSA only, selected by `kid`).

use follow_token::{UserClaims, Verifier, VerifyingKeys};
use tonic::metadata::MetadataMap;

use crate::error::ApiError;

/// The authenticated caller's user id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User(pub String);

#[derive(Debug)]
pub struct Authenticator {
    verifier: Verifier<UserClaims>,
}

impl Authenticator {
    pub fn new(keys: VerifyingKeys) -> Self {
        Self {
            verifier: Verifier::new(keys).with_leeway(30),
        }
    }

    pub fn user(&self, metadata: &MetadataMap) -> Result<User, ApiError> {
        let header = metadata
            .get("authorization")
            .ok_or_else(|| ApiError::Unauthenticated("no authorization metadata".into()))?
            .to_str()
            .map_err(|_| ApiError::Unauthenticated("authorization is not text".into()))?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or_else(|| ApiError::Unauthenticated("expected `Bearer <token>`".into()))?;
        let claims = self
            .verifier
            .verify(token.trim())
            .map_err(|e| ApiError::Unauthenticated(e.to_string()))?;
        Ok(User(claims.sub))
    }
}
