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
    /// The header's `typ`: one value per kind, so one kind can never pass for another.
    const TYPE: &'static str;
    /// The longest a token of this kind may live (`exp` − `iat`).
    const MAX_LIFETIME: Duration;

    /// `iat` and `exp`, in seconds since the epoch.
    fn lifetime(&self) -> (u64, u64);

    /// Checks that relate claims to each other, run after the signature and `exp`/`aud`/`iss`.
    fn check(&self) -> Result<(), TokenError> {
        Ok(())
    }
}

/// The longest `sub` may be (a route's owner is at most this long).
pub const MAX_SUB_LEN: usize = 256;

/// A `sub` follow accepts: 1–256 bytes, no control characters.
fn check_sub(sub: &str) -> Result<(), TokenError> {
    if sub.is_empty() || sub.len() > MAX_SUB_LEN || sub.chars().any(char::is_control) {
        return Err(TokenError::InvalidClaims(format!(
            "sub must be 1-{MAX_SUB_LEN} bytes without control characters"
        )));
    }
    Ok(())
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

/// Claims of the one-time upload token (docs/architecture.md, "Tokens").
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
    /// `JWT`, as docs/architecture.md gives the upload token's header (user tokens carry their own).
    const TYPE: &'static str = "JWT";
    const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);

    fn lifetime(&self) -> (u64, u64) {
        (self.iat, self.exp)
    }

    fn check(&self) -> Result<(), TokenError> {
        if self.jti != self.image_id {
            return Err(TokenError::InvalidClaims("jti must equal image_id".into()));
        }
        check_sub(&self.sub)?;
        if self.storage_key.is_empty() || self.content_type.is_empty() {
            return Err(TokenError::InvalidClaims(
                "storage_key and content_type must not be empty".into(),
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
    const TYPE: &'static str = "follow-user+jwt";
    const MAX_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);

    fn lifetime(&self) -> (u64, u64) {
        (self.iat, self.exp)
    }

    fn check(&self) -> Result<(), TokenError> {
        check_sub(&self.sub)
    }
}

fn unix_seconds(t: SystemTime) -> u64 {
    // A clock before 1970 is a broken host; clamping keeps issue infallible and the token expired.
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
