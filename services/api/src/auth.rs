//! Who is calling: the `sub` of the `authorization: Bearer <user JWT>` metadata, verified offline
//! with the configured public keys (EdDSA only, selected by `kid`).

use follow_service::auth::bearer_of;
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
        let token = bearer_of(metadata.as_ref())
            .map_err(|e| ApiError::Unauthenticated(e.to_string()))?
            .ok_or_else(|| ApiError::Unauthenticated("no authorization metadata".into()))?;
        let claims = self
            .verifier
            .verify(token)
            .map_err(|e| ApiError::Unauthenticated(e.to_string()))?;
        Ok(User(claims.sub))
    }
}
