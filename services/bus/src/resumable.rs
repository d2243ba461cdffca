//! The shared state of resumable uploads, so that any gateway instance can take the next chunk:
//! one record per image (`image:resumable:{pN}:{image_id}`, JSON), a lock that lets one append
//! run at a time (`…:lock`, a lease its holder renews while bytes come), the partition's uploads
//! by expiry for the sweepers, and each user's open uploads (bounded).
//!
//! A record is written only by the holder of its lock ([`Resumables::save`] checks it in the
//! same script), so two appends at once cannot both move the offset.

use std::time::Duration;

use redis::Script;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::{BusError, Connection, Valkey, keys};

/// How long a record outlives its upload's expiry: the sweeper still finds what to remove.
const RECORD_SLACK: Duration = Duration::from_secs(3600);

/// One resumable upload: what it is bound to, how far it is durable, and where its bytes are.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Resumable {
    pub image_id: Uuid,
    /// The random half of the upload's URL: who knows it may append.
    pub nonce: String,
    /// The token's claims the upload carries on (owner, object, type, size limit, expiry).
    pub owner: String,
    pub storage_key: String,
    pub content_type: String,
    pub length: u64,
    /// The token's own expiry (Unix seconds): the job's and the guard's lives follow from it.
    pub token_expires: i64,
    /// Bytes durable in S3: the parts, then the tail object.
    pub offset: u64,
    /// When the upload expires if nothing more comes (Unix seconds).
    pub expires: i64,
    /// The S3 multipart upload of the original, once a part was stored.
    pub multipart: Option<String>,
    /// The stored parts, in order (part `n` is the n-th).
    pub parts: Vec<Part>,
    /// The bytes after the parts, in the tail object (`tail_key`).
    pub tail: u64,
    pub tail_key: Option<String>,
    /// The body's checks as of `offset` (opaque here: the gateway's).
    pub check: String,
    /// The upload ended with its photo accepted: kept (without its parts) until the token
    /// expires, so that a client that lost the last answer learns so.
    #[serde(default)]
    pub completed: bool,
}

/// One stored part of a multipart upload.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Part {
    pub etag: String,
    pub bytes: u64,
    /// Its SHA-256, base64, as S3 checked it.
    pub sha256: String,
}

impl Resumable {
    pub fn expires_at(&self) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(self.expires).unwrap_or(OffsetDateTime::UNIX_EPOCH)
    }

    pub fn is_expired(&self) -> bool {
        self.expires_at() <= OffsetDateTime::now_utc()
    }
}

/// KEYS: record, expiries. ARGV: record JSON, record TTL (ms), image id, expiry (Unix ms).
const CREATE: &str = r"
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[3])
return 1
";

/// KEYS: record, lock, expiries. ARGV: holder, record JSON, record TTL (ms), image id, expiry
/// (Unix ms). Written only while `holder` holds the lock and the record is there.
const SAVE: &str = r"
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[4])
return 1
";

/// KEYS: lock. ARGV: holder, lease (ms).
const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

/// KEYS: lock. ARGV: holder.
const UNLOCK: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// KEYS: expiries. ARGV: now (Unix ms), lease (ms), limit. The ids of uploads expired by now,
/// each held back for `lease` (its sweeper removes it when done; another takes it after).
const DUE: &str = r"
local due = redis.call('ZRANGE', KEYS[1], '-inf', ARGV[1], 'BYSCORE', 'LIMIT', 0, ARGV[3])
for _, id in ipairs(due) do
  redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + tonumber(ARGV[2]), id)
end
return due
";

/// KEYS: the user's set. ARGV: now (Unix ms), most open, image id, expiry (Unix ms). 1 if the
/// upload is counted (it was already, or there was room), 0 if the user has the most open.
const OPEN: &str = r"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if not redis.call('ZSCORE', KEYS[1], ARGV[3]) then
  if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
end
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[3])
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], tonumber(last[2]) + 60000)
return 1
";

/// KEYS: record, expiries. ARGV: record JSON, record TTL (ms), image id.
const FINISH: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('ZREM', KEYS[2], ARGV[3])
return 1
";

/// KEYS: record, lock, expiries. ARGV: image id.
const REMOVE: &str = r"
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[1])
return 1
";

/// The resumable uploads' state in Valkey.
#[derive(Debug, Clone)]
pub struct Resumables {
    conn: Connection,
    partitions: keys::Partitions,
    create: Script,
    save: Script,
    renew: Script,
    unlock: Script,
    due: Script,
    open: Script,
    finish: Script,
    remove: Script,
}

fn unix_ms(at: OffsetDateTime) -> i64 {
    i64::try_from((at - OffsetDateTime::UNIX_EPOCH).whole_milliseconds()).unwrap_or(i64::MAX)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl Resumables {
    pub fn new(valkey: &Valkey) -> Result<Self, BusError> {
        Ok(Self {
            conn: valkey.connection()?,
            partitions: valkey.partitions(),
            create: Script::new(CREATE),
            save: Script::new(SAVE),
            renew: Script::new(RENEW),
            unlock: Script::new(UNLOCK),
            due: Script::new(DUE),
            open: Script::new(OPEN),
            finish: Script::new(FINISH),
            remove: Script::new(REMOVE),
        })
    }

    pub fn partitions(&self) -> keys::Partitions {
        self.partitions
    }

    fn record_ttl(record: &Resumable) -> u64 {
        let left = record.expires_at() - OffsetDateTime::now_utc();
        millis(Duration::try_from(left).unwrap_or_default() + RECORD_SLACK)
    }

    fn encode(record: &Resumable) -> Result<String, BusError> {
        serde_json::to_string(record).map_err(|e| BusError::Invalid(e.to_string()))
    }

    /// Creates `record`; `false` if the image has one already.
    pub async fn create(&self, record: &Resumable) -> Result<bool, BusError> {
        let id = record.image_id;
        let created: i64 = self
            .create
            .key(self.partitions.resumable(id))
            .key(self.partitions.of(id).resumable_expiries())
            .arg(Self::encode(record)?)
            .arg(Self::record_ttl(record))
            .arg(id.to_string())
            .arg(unix_ms(record.expires_at()))
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(created == 1)
    }

    /// The image's upload record, if it has one.
    pub async fn load(&self, image_id: Uuid) -> Result<Option<Resumable>, BusError> {
        let raw: Option<String> = redis::cmd("GET")
            .arg(self.partitions.resumable(image_id))
            .query_async(&mut self.conn.clone())
            .await?;
        raw.map(|raw| {
            serde_json::from_str(&raw)
                .map_err(|e| BusError::Reply(format!("a resumable upload record: {e}")))
        })
        .transpose()
    }

    /// Takes the image's append lock for `lease`; `false` when someone holds it.
    pub async fn lock(
        &self,
        image_id: Uuid,
        holder: &str,
        lease: Duration,
    ) -> Result<bool, BusError> {
        let set: Option<String> = redis::cmd("SET")
            .arg(self.partitions.resumable_lock(image_id))
            .arg(holder)
            .arg("NX")
            .arg("PX")
            .arg(millis(lease))
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(set.is_some())
    }

    /// Extends `holder`'s lock; `false` when it lost it.
    pub async fn renew(
        &self,
        image_id: Uuid,
        holder: &str,
        lease: Duration,
    ) -> Result<bool, BusError> {
        let renewed: i64 = self
            .renew
            .key(self.partitions.resumable_lock(image_id))
            .arg(holder)
            .arg(millis(lease))
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(renewed == 1)
    }

    pub async fn unlock(&self, image_id: Uuid, holder: &str) -> Result<(), BusError> {
        let _: i64 = self
            .unlock
            .key(self.partitions.resumable_lock(image_id))
            .arg(holder)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    /// Writes `record` if `holder` holds its lock and it still exists; `false` otherwise.
    pub async fn save(&self, record: &Resumable, holder: &str) -> Result<bool, BusError> {
        let id = record.image_id;
        let saved: i64 = self
            .save
            .key(self.partitions.resumable(id))
            .key(self.partitions.resumable_lock(id))
            .key(self.partitions.of(id).resumable_expiries())
            .arg(holder)
            .arg(Self::encode(record)?)
            .arg(Self::record_ttl(record))
            .arg(id.to_string())
            .arg(unix_ms(record.expires_at()))
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(saved == 1)
    }

    /// Marks the image's upload completed for `keep` (its record replaced by `record`, which
    /// says so, and out of the expiries: no sweeper looks at it again).
    pub async fn finish(&self, record: &Resumable, keep: Duration) -> Result<(), BusError> {
        let id = record.image_id;
        let _: i64 = self
            .finish
            .key(self.partitions.resumable(id))
            .key(self.partitions.of(id).resumable_expiries())
            .arg(Self::encode(record)?)
            .arg(millis(keep))
            .arg(id.to_string())
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    /// Forgets the image's upload (its record, lock and place among the expiries).
    pub async fn remove(&self, image_id: Uuid) -> Result<(), BusError> {
        let _: i64 = self
            .remove
            .key(self.partitions.resumable(image_id))
            .key(self.partitions.resumable_lock(image_id))
            .key(self.partitions.of(image_id).resumable_expiries())
            .arg(image_id.to_string())
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    /// Up to `limit` uploads of `partition` expired by now, each held back from other sweepers
    /// for `lease`.
    pub async fn due(
        &self,
        partition: keys::Partition,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<Uuid>, BusError> {
        let ids: Vec<String> = self
            .due
            .key(partition.resumable_expiries())
            .arg(unix_ms(OffsetDateTime::now_utc()))
            .arg(millis(lease))
            .arg(limit)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(ids.iter().filter_map(|id| id.parse().ok()).collect())
    }

    /// Counts the upload among its owner's open ones, until `expires`; `false` when the owner
    /// has `most` open already.
    pub async fn open(
        &self,
        owner: &str,
        image_id: Uuid,
        expires: OffsetDateTime,
        most: u32,
    ) -> Result<bool, BusError> {
        let counted: i64 = self
            .open
            .key(keys::resumable_of_user(owner))
            .arg(unix_ms(OffsetDateTime::now_utc()))
            .arg(most)
            .arg(image_id.to_string())
            .arg(unix_ms(expires))
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(counted == 1)
    }

    /// The upload no longer counts among its owner's open ones.
    pub async fn close(&self, owner: &str, image_id: Uuid) -> Result<(), BusError> {
        let _: i64 = redis::cmd("ZREM")
            .arg(keys::resumable_of_user(owner))
            .arg(image_id.to_string())
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }
}
