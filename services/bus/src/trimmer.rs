use redis::aio::ConnectionManager;

use crate::{BusError, EntryId, Valkey, keys};

/// Bounds `image:result` without ever dropping an entry the group has not acknowledged.
///
/// Every entry at or below the group's last-delivered id that is not pending has been
/// acknowledged; entries above it have not been delivered yet. So the cut is the oldest pending
/// entry if there is one, else just above the last-delivered id — `XTRIM MINID` keeps everything
/// from there on. Both bounds only grow, so reading them before trimming is race-free.
#[derive(Debug)]
pub struct Trimmer {
    conn: ConnectionManager,
    group: String,
}

impl Trimmer {
    pub fn new(valkey: &Valkey, group: &str) -> Result<Self, BusError> {
        Ok(Self {
            conn: valkey.connection()?,
            group: group.to_owned(),
        })
    }

    /// Trims once; returns how many entries were removed. Without the group nothing is trimmed.
    pub async fn trim(&mut self) -> Result<u64, BusError> {
        let Some(min_id) = self.keep_from().await? else {
            return Ok(0);
        };
        let removed: u64 = redis::cmd("XTRIM")
            .arg(keys::RESULT_STREAM)
            .arg("MINID")
            .arg(min_id.0.as_str())
            .query_async(&mut self.conn)
            .await?;
        if removed > 0 {
            tracing::debug!(removed, %min_id, "trimmed acknowledged results");
        }
        Ok(removed)
    }

    /// The smallest id that must be kept, or `None` when the group does not exist.
    async fn keep_from(&mut self) -> Result<Option<EntryId>, BusError> {
        let groups: Result<redis::streams::StreamInfoGroupsReply, _> = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(keys::RESULT_STREAM)
            .query_async(&mut self.conn)
            .await;
        let groups = match groups {
            Ok(g) => g,
            Err(e) if e.code() == Some("ERR") => return Ok(None), // no such stream
            Err(e) => return Err(e.into()),
        };
        let Some(group) = groups.groups.into_iter().find(|g| g.name == self.group) else {
            return Ok(None);
        };
        if group.pending > 0 {
            let summary: redis::streams::StreamPendingReply = redis::cmd("XPENDING")
                .arg(keys::RESULT_STREAM)
                .arg(&self.group)
                .query_async(&mut self.conn)
                .await?;
            if let redis::streams::StreamPendingReply::Data(data) = summary {
                return Ok(Some(EntryId(data.start_id)));
            }
        }
        EntryId(group.last_delivered_id)
            .successor()
            .map(Some)
            .ok_or_else(|| BusError::reply("last-delivered-id is not a stream id"))
    }
}
