use std::time::Duration;

use redis::Script;
use uuid::Uuid;

use crate::{BusError, Connection, Valkey, keys::Partitions};

/// The one-time upload guard `image:upload:{pN}:{image_id}` (`SET NX EX`): the first upload of a token
/// takes it, every later one finds it taken. While the body arrives it is a short lease its
/// gateway renews; a transfer that fails before anything is spent releases it, so the same token
/// works again (and a gateway that dies lets go of it when the lease runs out). Accepted
/// ([`crate::Producer::enqueue`]) or spent ([`UploadGuard::spend`]), it lives until the token
/// expires.
#[derive(Clone, Debug)]
pub struct UploadGuard {
    conn: Connection,
    partitions: Partitions,
    release: Script,
    renew: Script,
}

/// Where an upload is, as its guard tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuardState {
    /// Nobody took it (or it expired, or Valkey lost it).
    Free,
    /// A gateway took it: the body is arriving or being stored (a lease it renews while bytes
    /// come, so a gateway that died lets go of it on its own).
    Receiving,
    /// The upload was accepted and its job queued.
    Queued,
    /// A bad body spent the token.
    Spent,
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
/// The guard's value once a bad body spent the token.
const SPENT: &str = "spent";

/// Deletes the guard only if this holder still holds it.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// Extends the guard if this holder holds it, takes it again if nobody does (Valkey lost it);
/// anyone else's is left alone.
const RENEW: &str = r"
local held = redis.call('GET', KEYS[1])
if held == ARGV[1] then
  return redis.call('EXPIRE', KEYS[1], ARGV[2])
end
if not held then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  return 1
end
return 0
";

impl UploadGuard {
    pub fn new(valkey: &Valkey) -> Result<Self, BusError> {
        Ok(Self {
            conn: valkey.connection()?,
            partitions: valkey.partitions(),
            release: Script::new(RELEASE),
            renew: Script::new(RENEW),
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
            .arg(self.partitions.upload_guard(image_id))
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

    /// Renews `holder`'s lease for `ttl` while its body arrives, taking the guard again if it
    /// is gone (Valkey lost it and nobody took it since); `false` when someone else holds it.
    pub async fn renew(
        &mut self,
        image_id: Uuid,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, BusError> {
        let renewed: i64 = self
            .renew
            .key(self.partitions.upload_guard(image_id))
            .arg(holder)
            .arg(ttl.as_secs().max(1))
            .invoke_async(&mut self.conn)
            .await?;
        Ok(renewed == 1)
    }

    /// Marks the token spent by a bad body, until `ttl` (its expiry).
    pub async fn spend(&mut self, image_id: Uuid, ttl: Duration) -> Result<(), BusError> {
        let _: () = redis::cmd("SET")
            .arg(self.partitions.upload_guard(image_id))
            .arg(SPENT)
            .arg("EX")
            .arg(ttl.as_secs().max(1))
            .query_async(&mut self.conn)
            .await?;
        Ok(())
    }

    /// Gives the guard back (the upload spent nothing); `false` when `holder` did not hold it.
    pub async fn release(&mut self, image_id: Uuid, holder: &str) -> Result<bool, BusError> {
        let deleted: i64 = self
            .release
            .key(self.partitions.upload_guard(image_id))
            .arg(holder)
            .invoke_async(&mut self.conn)
            .await?;
        Ok(deleted == 1)
    }

    /// The state of `image_id`'s guard.
    pub async fn state(&mut self, image_id: Uuid) -> Result<GuardState, BusError> {
        let value: Option<String> = redis::cmd("GET")
            .arg(self.partitions.upload_guard(image_id))
            .query_async(&mut self.conn)
            .await?;
        Ok(match value.as_deref() {
            None => GuardState::Free,
            Some(QUEUED) => GuardState::Queued,
            Some(SPENT) => GuardState::Spent,
            Some(_) => GuardState::Receiving,
        })
    }
}
