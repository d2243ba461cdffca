use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use uuid::Uuid;

use crate::TokenError;

/// `iss` of every token follow issues.
pub const ISSUER: &str = "follow-api";
/// `aud` of upload tokens.
pub const UPLOAD_AUDIENCE: &str = "follow-image-gateway";
/// `aud` of user tokens.
pub const USER_AUDIENCE: &str = "follow-api";

/// A kind of token: its claims, who it is for, and checks beyond the JWT registered claims.
pub trait Claims: Serialize + DeserializeOwned {
    const AUDIENCE: &'static str;

    /// Checks that relate claims to each other, run after the signature and `exp`/`aud`/`iss`.
    fn check(&self) -> Result<(), TokenError> {
        Ok(())
    }
}

/// What the API grants with an upload token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadGrant {
    /// The route owner.
    pub sub: String,
    pub image_id: Uuid,
    pub storage_key: String,
    pub content_type: String,
    pub max_file_size: u64,
}

/// Claims of the one-time upload token (ARCHITECTURE.md, "Upload token").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadClaims {
    pub iss: String,
    pub aud: String,
    pub sub: String,
    /// Always the image id: the one-time guard is keyed by it.
    pub jti: Uuid,
    pub image_id: Uuid,
    pub storage_key: String,
    pub content_type: String,
    pub max_file_size: u64,
    pub iat: u64,
    pub exp: u64,
}

impl UploadClaims {
    pub fn new(grant: UploadGrant, issued_at: SystemTime, ttl: Duration) -> Self {
        let iat = unix_seconds(issued_at);
        Self {
            iss: ISSUER.to_owned(),
            aud: UPLOAD_AUDIENCE.to_owned(),
            sub: grant.sub,
            jti: grant.image_id,
            image_id: grant.image_id,
            storage_key: grant.storage_key,
            content_type: grant.content_type,
            max_file_size: grant.max_file_size,
            iat,
            exp: iat.saturating_add(ttl.as_secs()),
        }
    }

    pub fn expires_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.exp)
    }
}

impl Claims for UploadClaims {
    const AUDIENCE: &'static str = UPLOAD_AUDIENCE;

    fn check(&self) -> Result<(), TokenError> {
        if self.jti != self.image_id {
            return Err(TokenError::InvalidClaims("jti must equal image_id".into()));
        }
        if self.sub.is_empty() || self.storage_key.is_empty() || self.content_type.is_empty() {
            return Err(TokenError::InvalidClaims(
                "sub, storage_key and content_type must not be empty".into(),
            ));
        }
        Ok(())
    }
}

/// Claims of a user token: who calls the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserClaims {
    pub iss: String,
    pub aud: String,
    pub sub: String,
    pub iat: u64,
    pub exp: u64,
}

impl UserClaims {
    pub fn new(sub: impl Into<String>, issued_at: SystemTime, ttl: Duration) -> Self {
        let iat = unix_seconds(issued_at);
        Self {
            iss: ISSUER.to_owned(),
            aud: USER_AUDIENCE.to_owned(),
            sub: sub.into(),
            iat,
            exp: iat.saturating_add(ttl.as_secs()),
        }
    }
}

impl Claims for UserClaims {
    const AUDIENCE: &'static str = USER_AUDIENCE;

    fn check(&self) -> Result<(), TokenError> {
        if self.sub.is_empty() {
            return Err(TokenError::InvalidClaims("sub must not be empty".into()));
        }
        Ok(())
    }
}

fn unix_seconds(t: SystemTime) -> u64 {
    // A clock before 1970 is a broken host; clamping keeps issue infallible and the token expired.
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
