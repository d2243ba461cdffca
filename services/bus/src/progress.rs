use std::time::Duration;

use redis::Script;
use uuid::Uuid;

use crate::{
    BusError, Committed, Connection, DecodeError, ErrorCode, Failure, Notice, Progress, Stage,
    Valkey,
    codec::{format_time, parse_time},
    keys::{self, Partitions},
};

/// Writes `image:status:{pN}:{id}` (stage, seq, updated_at, error fields), refreshes its TTL and
/// publishes the [`Progress`] on its partition's channel `image:progress:{pN}`: one script (the
/// two share the partition's slot), so one round trip and no
/// interleaving. A write whose `seq` is not above the stored one is dropped, so a late or
/// duplicate report can never move an image backwards (say, `processing` after `failed`).
#[derive(Clone, Debug)]
pub struct ProgressTracker {
    conn: Connection,
    script: Script,
    ttl: Duration,
    partitions: Partitions,
    /// `PUBLISH` or `SPUBLISH` ([`Valkey::publish_command`]).
    publish: &'static str,
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
redis.call(ARGV[8], KEYS[2], ARGV[7])
return 1
";

impl ProgressTracker {
    pub fn new(valkey: &Valkey) -> Result<Self, BusError> {
        Ok(Self {
            conn: valkey.connection()?,
            script: Script::new(RECORD),
            ttl: keys::STATUS_TTL,
            partitions: valkey.partitions(),
            publish: valkey.publish_command(),
        })
    }

    pub async fn record(&mut self, progress: &Progress) -> Result<Recorded, BusError> {
        let (code, message) = progress
            .failure()
            .map_or(("", ""), |f| (f.code.as_str(), f.message.as_str()));
        let image_id = progress.image_id();
        let applied: i64 = self
            .script
            .key(self.partitions.status(image_id))
            .key(self.partitions.progress(image_id))
            .arg(progress.stage().as_str())
            .arg(progress.seq())
            .arg(format_time(progress.at()))
            .arg(code)
            .arg(message)
            .arg(self.ttl.as_secs())
            .arg(Notice::Progress(progress.clone()).encode())
            .arg(self.publish)
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

    /// Publishes the API's [`Committed`] announcement on the image's channel (no hash write: it
    /// follows the gateway's final stage).
    pub async fn announce(&mut self, committed: Committed) -> Result<(), BusError> {
        let channel = self.partitions.progress(committed.image_id);
        let _receivers: i64 = redis::cmd(self.publish)
            .arg(channel)
            .arg(Notice::Committed(Box::new(committed)).encode())
            .query_async(&mut self.conn)
            .await?;
        Ok(())
    }

    /// The current status of an image, `None` when there is none (never written, or expired).
    pub async fn current(&mut self, image_id: Uuid) -> Result<Option<Progress>, BusError> {
        let fields: Vec<(String, String)> = redis::cmd("HGETALL")
            .arg(self.partitions.status(image_id))
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
        let progress = match stage {
            Stage::Failed => Progress::failed(
                image_id,
                Failure {
                    code: get("error_code")?
                        .parse::<ErrorCode>()
                        .map_err(|()| invalid("error_code", "unknown code"))?,
                    message: get("error_message").unwrap_or_default().to_owned(),
                },
            ),
            stage => Progress::reached(image_id, stage),
        };
        if get("seq")?.parse::<u64>().ok() != Some(progress.seq()) {
            return Err(invalid("seq", "does not match the stage").into());
        }
        Ok(Some(
            progress.at_time(parse_time("updated_at", get("updated_at")?)?),
        ))
    }
}
