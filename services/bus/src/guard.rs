use std::time::Duration;

use redis::aio::ConnectionManager;
use uuid::Uuid;

use crate::{BusError, Valkey, keys};

/// The one-time upload guard `image:upload:{image_id}` (`SET NX EX`): the first upload of a token
/// takes it, every later one finds it taken.
#[derive(Clone, Debug)]
pub struct UploadGuard {
    conn: ConnectionManager,
    ttl: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuardOutcome {
    /// This caller holds the guard: go on with the upload.
    Acquired,
    /// Someone already took it: a duplicate upload.
    Taken,
}

impl UploadGuard {
    pub fn new(valkey: &Valkey) -> Result<Self, BusError> {
        Ok(Self {
            conn: valkey.connection()?,
            ttl: keys::UPLOAD_GUARD_TTL,
        })
    }

    /// `holder` is stored as the value, for operators (which gateway instance took it).
    pub async fn acquire(
        &mut self,
        image_id: Uuid,
        holder: &str,
    ) -> Result<GuardOutcome, BusError> {
        let set: Option<String> = redis::cmd("SET")
            .arg(keys::upload_guard(image_id))
            .arg(holder)
            .arg("NX")
            .arg("EX")
            .arg(self.ttl.as_secs())
            .query_async(&mut self.conn)
            .await?;
        Ok(match set {
            Some(_) => GuardOutcome::Acquired,
            None => GuardOutcome::Taken,
        })
    }
}
