use std::time::Duration;

use redis::{Script, aio::ConnectionManager};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::{
    BusError, DecodeError, ErrorCode, Failure, Progress, Stage, Valkey,
    codec::{format_time, parse_time},
    keys,
};

/// Writes `image:status:{id}` (stage, seq, updated_at, error fields), refreshes its TTL and
/// publishes the [`Progress`] on `image:progress:{id}`: one script, so one round trip and no
/// interleaving. A write whose `seq` is not above the stored one is dropped, so a late or
/// duplicate report can never move an image backwards (say, `processing` after `failed`).
#[derive(Clone, Debug)]
pub struct ProgressTracker {
    conn: ConnectionManager,
    script: Script,
    ttl: Duration,
}

/// Whether a report was applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    Applied,
    /// The hash already holds this stage or a later one; nothing was written or published.
    Stale,
}

const RECORD: &str = r"
local current = tonumber(redis.call('HGET', KEYS[1], 'seq'))
if current and current >= tonumber(ARGV[2]) then
  return 0
end
redis.call('HSET', KEYS[1], 'stage', ARGV[1], 'seq', ARGV[2], 'updated_at', ARGV[3])
if ARGV[4] ~= '' then
  redis.call('HSET', KEYS[1], 'error_code', ARGV[4], 'error_message', ARGV[5])
end
redis.call('EXPIRE', KEYS[1], ARGV[6])
redis.call('PUBLISH', KEYS[2], ARGV[7])
return 1
";

/// What `image:status:{id}` holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusSnapshot {
    pub stage: Stage,
    pub seq: u64,
    pub updated_at: OffsetDateTime,
    pub failure: Option<Failure>,
}

impl ProgressTracker {
    pub fn new(valkey: &Valkey) -> Result<Self, BusError> {
        Ok(Self {
            conn: valkey.connection()?,
            script: Script::new(RECORD),
            ttl: keys::STATUS_TTL,
        })
    }

    pub async fn record(&mut self, progress: &Progress) -> Result<Recorded, BusError> {
        let (code, message) = progress
            .failure
            .as_ref()
            .map_or(("", ""), |f| (f.code.as_str(), f.message.as_str()));
        let applied: i64 = self
            .script
            .key(keys::status(progress.image_id))
            .key(keys::progress(progress.image_id))
            .arg(progress.stage.as_str())
            .arg(progress.seq)
            .arg(format_time(progress.at))
            .arg(code)
            .arg(message)
            .arg(self.ttl.as_secs())
            .arg(progress.encode())
            .invoke_async(&mut self.conn)
            .await?;
        Ok(if applied == 1 {
            Recorded::Applied
        } else {
            Recorded::Stale
        })
    }

    /// Records many reports at once, pipelined on the one multiplexed connection.
    pub async fn record_all(&mut self, reports: &[Progress]) -> Result<Vec<Recorded>, BusError> {
        let calls = reports.iter().map(|p| {
            let mut tracker = self.clone();
            async move { tracker.record(p).await }
        });
        futures_util::future::try_join_all(calls).await
    }

    /// Publishes `progress` on its channel only (no hash write): for the API's
    /// [`Progress::committed`] announcements, which follow the gateway's final stage.
    pub async fn announce(&mut self, progress: &Progress) -> Result<(), BusError> {
        let _receivers: i64 = redis::cmd("PUBLISH")
            .arg(keys::progress(progress.image_id))
            .arg(progress.encode())
            .query_async(&mut self.conn)
            .await?;
        Ok(())
    }

    /// The current status of an image, `None` when there is none (never written, or expired).
    pub async fn current(&mut self, image_id: Uuid) -> Result<Option<StatusSnapshot>, BusError> {
        let fields: Vec<(String, String)> = redis::cmd("HGETALL")
            .arg(keys::status(image_id))
            .query_async(&mut self.conn)
            .await?;
        if fields.is_empty() {
            return Ok(None);
        }
        let get = |name: &'static str| {
            fields
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
                .ok_or(DecodeError::MissingField(name))
        };
        let invalid = |field: &'static str, reason: &str| DecodeError::InvalidField {
            field,
            reason: reason.to_owned(),
        };
        let stage: Stage = get("stage")?
            .parse()
            .map_err(|()| invalid("stage", "unknown stage"))?;
        let failure = match stage {
            Stage::Failed => Some(Failure {
                code: get("error_code")?
                    .parse::<ErrorCode>()
                    .map_err(|()| invalid("error_code", "unknown code"))?,
                message: get("error_message").unwrap_or_default().to_owned(),
            }),
            _ => None,
        };
        Ok(Some(StatusSnapshot {
            stage,
            seq: get("seq")?
                .parse()
                .map_err(|_| invalid("seq", "not a number"))?,
            updated_at: parse_time("updated_at", get("updated_at")?)?,
            failure,
        }))
    }
}
