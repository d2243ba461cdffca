use std::time::Duration;

use redis::{Script, aio::ConnectionManager};
use uuid::Uuid;

use crate::{BusError, Valkey, keys};

/// The one-time upload guard `image:upload:{image_id}` (`SET NX EX`): the first upload of a token
/// takes it, every later one finds it taken. A transfer that fails before anything is spent
/// releases it, so the same token works again.
#[derive(Clone, Debug)]
pub struct UploadGuard {
    conn: ConnectionManager,
    release: Script,
}

/// Where an upload is, as its guard tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuardState {
    /// Nobody took it (or it expired, or Valkey lost it).
    Free,
    /// A gateway took it: the body is arriving or being stored.
    Receiving,
    /// The upload was accepted and its job queued.
    Queued,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuardOutcome {
    /// This caller holds the guard: go on with the upload.
    Acquired,
    /// Someone already took it: a duplicate upload.
    Taken,
}

/// The guard's value once the upload's job is queued (see [`crate::Producer::enqueue`]).
pub(crate) const QUEUED: &str = "queued";

/// Deletes the guard only if this holder still holds it.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

impl UploadGuard {
    pub fn new(valkey: &Valkey) -> Result<Self, BusError> {
        Ok(Self {
            conn: valkey.connection()?,
            release: Script::new(RELEASE),
        })
    }

    /// Takes the guard for `ttl` (at least a second). `holder` is stored as the value: it names
    /// who took it, for operators, and only that holder can [`UploadGuard::release`] it.
    pub async fn acquire(
        &mut self,
        image_id: Uuid,
        holder: &str,
        ttl: Duration,
    ) -> Result<GuardOutcome, BusError> {
        let set: Option<String> = redis::cmd("SET")
            .arg(keys::upload_guard(image_id))
            .arg(holder)
            .arg("NX")
            .arg("EX")
            .arg(ttl.as_secs().max(1))
            .query_async(&mut self.conn)
            .await?;
        Ok(match set {
            Some(_) => GuardOutcome::Acquired,
            None => GuardOutcome::Taken,
        })
    }

    /// Gives the guard back (the upload spent nothing); `false` when `holder` did not hold it.
    pub async fn release(&mut self, image_id: Uuid, holder: &str) -> Result<bool, BusError> {
        let deleted: i64 = self
            .release
            .key(keys::upload_guard(image_id))
            .arg(holder)
            .invoke_async(&mut self.conn)
            .await?;
        Ok(deleted == 1)
    }

    /// The state of `image_id`'s guard.
    pub async fn state(&mut self, image_id: Uuid) -> Result<GuardState, BusError> {
        let value: Option<String> = redis::cmd("GET")
            .arg(keys::upload_guard(image_id))
            .query_async(&mut self.conn)
            .await?;
        Ok(match value.as_deref() {
            None => GuardState::Free,
            Some(QUEUED) => GuardState::Queued,
            Some(_) => GuardState::Receiving,
        })
    }
}
